"""Task params are checked before a task is admitted: a 400 that names what is wrong by its
path (`params.operations[2].degrees`). The vocabulary is `tasktypes.params` (pydantic)."""

from __future__ import annotations

import math

import pytest
from pydantic import BaseModel, ValidationError

from models.errors import InvalidInput
from tasktypes.inputs import MAX_VIDEO_IMAGES, input_sources, source_ref
from tasktypes.params import (
    MAX_EDIT_OPERATIONS,
    OPERATION_NAMES,
    AnalysisParams,
    EditParams,
    VideoParams,
    normalize_params,
    parse_color,
    parse_params,
)

EDIT, VIDEO, ANALYSIS = "advanced_editing", "video_generation", "image_analysis"


def refusal(task_type: str, params) -> InvalidInput:
    """The 400 the API makes of the params' validation error."""
    with pytest.raises(ValidationError) as caught:
        parse_params(task_type, params)
    error = InvalidInput.from_validation(caught.value, params, prefix="params", code="invalid_params")
    assert error.status_code == 400 and error.code == "invalid_params"
    # The processors' reading refuses the same params.
    with pytest.raises(ValidationError):
        normalize_params(task_type, params)
    return error


def edit_refusal(*operations, **top) -> str:
    return refusal(EDIT, {"operations": list(operations), **top}).message


ALL_OPERATIONS = ", ".join(OPERATION_NAMES)


class TestEditOperations:
    def test_a_full_chain_is_accepted_with_defaults_filled_in(self):
        spec = normalize_params(EDIT, {"operations": [
            {"op": "auto_orient"}, {"op": "resize", "width": 800}, {"op": "crop", "box": [0, 0, 400, 300]},
            {"op": "rotate", "degrees": -12.5}, {"op": "flip", "direction": "vertical"}, "grayscale",
            {"op": "brightness", "factor": 1.2}, {"op": "contrast", "factor": 0.8}, {"op": "saturation", "factor": 0},
            {"op": "sharpen"}, {"op": "blur", "radius": 1.5}, {"op": "auto_contrast", "cutoff": 2},
            {"op": "watermark", "text": "  © me  "},
        ], "format": "jpg", "quality": 70})
        ops = spec["operations"]
        assert [op["op"] for op in ops][:6] == ["auto_orient", "resize", "crop", "rotate", "flip", "grayscale"]
        assert ops[0] == {"op": "auto_orient"} and ops[5] == {"op": "grayscale"}
        assert ops[1] == {"op": "resize", "width": 800, "height": None, "fit": "inside", "background": (0, 0, 0, 255)}
        assert ops[2] == {"op": "crop", "box": (0, 0, 400, 300)} and isinstance(ops[2]["box"], tuple)
        assert ops[3] == {"op": "rotate", "degrees": -12.5, "expand": True, "fill": None}
        assert ops[4] == {"op": "flip", "direction": "vertical"}
        assert ops[6] == {"op": "brightness", "factor": 1.2} and ops[8] == {"op": "saturation", "factor": 0}
        assert ops[9] == {"op": "sharpen", "radius": 2.0, "amount": 150, "threshold": 3}
        assert ops[10] == {"op": "blur", "radius": 1.5} and ops[11] == {"op": "auto_contrast", "cutoff": 2}
        assert ops[12] == {"op": "watermark", "text": "© me", "position": "bottom-right", "opacity": 0.5,
                           "size": 0.05, "color": (255, 255, 255, 255), "margin": 0.02}
        assert spec == {"operations": ops, "format": "jpeg", "quality": 70, "background": (255, 255, 255, 255),
                        "autoOrient": True}

    def test_the_parsed_model_reads_the_same(self):
        params = {"operations": [{"op": "rotate", "degrees": 90, "fill": "#f00"}], "auto_orient": False}
        model = parse_params(EDIT, params)
        assert isinstance(model, EditParams) and model.auto_orient is False
        assert model.operations[0].op == "rotate" and model.operations[0].fill == (255, 0, 0, 255)
        assert normalize_params(EDIT, model) == normalize_params(EDIT, params)

    def test_a_dump_of_the_model_reads_the_same_again(self):
        params = {"operations": ["grayscale", {"op": "crop", "box": [1, 2, 3, 4]},
                                 {"op": "crop", "left": 1, "width": 5, "height": 6},
                                 {"op": "watermark", "text": "hi", "color": [1, 2, 3]}], "background": "red"}
        model = parse_params(EDIT, params)
        for mode in ("python", "json"):
            assert normalize_params(EDIT, model.model_dump(mode=mode, by_alias=True)) == normalize_params(EDIT, params)

    def test_crop_by_left_top_width_height(self):
        crop = {"op": "crop", "left": 10, "top": 20, "width": 30, "height": 40}
        spec = normalize_params(EDIT, {"operations": [crop]})
        assert spec["operations"][0] == {"op": "crop", "box": (10, 20, 40, 60)}
        spec = normalize_params(EDIT, {"operations": [{"op": "crop", "width": 30, "height": 40}]})
        assert spec["operations"][0]["box"] == (0, 0, 30, 40)

    def test_the_message_names_the_operation_by_index_and_the_option(self):
        message = edit_refusal({"op": "resize", "width": 10}, "grayscale", {"op": "rotate", "degrees": "ninety"})
        assert message == "params.operations[2].degrees: must be a valid number"
        message = edit_refusal({"op": "resize", "width": 10}, "grayscale", {"op": "rotate", "degrees": 400})
        assert message == "params.operations[2].degrees: must be less than or equal to 360"

    @pytest.mark.parametrize("operation, expected", [
        ({"op": "rotate"}, "params.operations[0].degrees: is required"),
        ("rotate", "params.operations[0].degrees: is required"),
        ({"op": "rotate", "degrees": 400}, "params.operations[0].degrees: must be less than or equal to 360"),
        ({"op": "rotate", "degrees": -361}, "params.operations[0].degrees: must be greater than or equal to -360"),
        ({"op": "rotate", "degrees": 90, "expand": "yes"}, "params.operations[0].expand: must be a valid boolean"),
        ({"op": "rotate", "degrees": 90, "fill": "mauve-ish"}, 'params.operations[0].fill: must be a colour: "#rgb"'),
        ({"op": "resize"}, "params.operations[0].width: width or height is required"),
        ({"op": "resize", "width": 0}, "params.operations[0].width: must be greater than or equal to 1"),
        ({"op": "resize", "height": 10001}, "params.operations[0].height: must be less than or equal to 10000"),
        ({"op": "resize", "width": 10.5}, "params.operations[0].width: must be a valid integer"),
        ({"op": "resize", "width": 10, "fit": "stretch"},
         "params.operations[0].fit: must be 'inside', 'contain', 'cover' or 'fill'"),
        ({"op": "resize", "width": 10, "mode": "x"}, "params.operations[0].mode: is not a known option"),
        ({"op": "crop", "box": [0, 0, 10]}, "params.operations[0].box: must be [left, top, right, bottom]"),
        ({"op": "crop", "box": [0, 0, 10, 1.5]}, "params.operations[0].box: must be [left, top, right, bottom]"),
        ({"op": "crop", "box": [10, 0, 5, 10]}, "params.operations[0].box: must have right > left and bottom > top"),
        ({"op": "crop", "box": [0, 0, 5, 5], "left": 1}, "params.operations[0].box: give either box"),
        ({"op": "crop", "left": 1, "height": 5}, "params.operations[0].width: is required"),
        ({"op": "crop", "width": 5}, "params.operations[0].height: is required"),
        ({"op": "flip", "direction": "diagonal"}, "params.operations[0].direction: must be 'horizontal' or 'vertical'"),
        ({"op": "brightness"}, "params.operations[0].factor: is required"),
        ({"op": "contrast", "factor": -1}, "params.operations[0].factor: must be greater than or equal to 0"),
        ({"op": "contrast", "factor": 11}, "params.operations[0].factor: must be less than or equal to 10"),
        ({"op": "saturation", "factor": True}, "params.operations[0].factor: must be a valid number"),
        ({"op": "saturation", "factor": "1"}, "params.operations[0].factor: must be a valid number"),
        ({"op": "sharpen", "amount": 5000}, "params.operations[0].amount: must be less than or equal to 1000"),
        ({"op": "sharpen", "radius": 0.05}, "params.operations[0].radius: must be greater than or equal to 0.1"),
        ({"op": "sharpen", "threshold": 256}, "params.operations[0].threshold: must be less than or equal to 255"),
        ({"op": "blur", "radius": 0}, "params.operations[0].radius: must be greater than 0"),
        ({"op": "blur", "radius": 101}, "params.operations[0].radius: must be less than or equal to 100"),
        ({"op": "auto_contrast", "cutoff": 50}, "params.operations[0].cutoff: must be less than or equal to 49"),
        ({"op": "watermark"}, "params.operations[0].text: is required"),
        ({"op": "watermark", "text": "   "}, "params.operations[0].text: must not be empty"),
        ({"op": "watermark", "text": 5}, "params.operations[0].text: must be a valid string"),
        ({"op": "watermark", "text": "x" * 201}, "params.operations[0].text: must be at most 200 characters"),
        ({"op": "watermark", "text": "x", "opacity": 2},
         "params.operations[0].opacity: must be less than or equal to 1"),
        ({"op": "watermark", "text": "x", "size": 0.6}, "params.operations[0].size: must be less than or equal to 0.5"),
        ({"op": "watermark", "text": "x", "margin": -1}, "params.operations[0].margin: must be greater than or equal"),
        ({"op": "watermark", "text": "x", "position": "middle"}, "params.operations[0].position: must be 'top-left'"),
        ({"op": "watermark", "text": "x", "color": [256, 0, 0]}, "params.operations[0].color: must be a colour"),
        ({"op": "grayscale", "amount": 1}, "params.operations[0].amount: is not a known option"),
        ({"op": "grayscale", "amount": None}, "params.operations[0].amount: is not a known option"),
        ({"op": "posterize"},
         f"params.operations[0].op: unknown operation 'posterize'; must be one of {ALL_OPERATIONS}"),
        ({"type": "posterize"}, "params.operations[0].type: unknown operation 'posterize'"),
        ("posterize", "params.operations[0].op: unknown operation 'posterize'"),
        ({"width": 10}, f"params.operations[0].op: is required (one of {ALL_OPERATIONS})"),
        ({"op": 5}, "params.operations[0].op: is required"),
        (42, 'params.operations[0]: must be an object like {"op": "resize", ...} or an operation name'),
        (None, "params.operations[0]: must be an object"),
    ])
    def test_each_option_is_checked(self, operation, expected):
        assert edit_refusal(operation).startswith(expected)

    def test_a_colour_message_lists_the_forms(self):
        message = edit_refusal({"op": "rotate", "degrees": 90, "fill": "mauve-ish"})
        assert message == ('params.operations[0].fill: must be a colour: "#rgb", "#rgba", "#rrggbb", "#rrggbbaa", '
                           'a name (transparent, black, white, gray, grey, red, green, blue, yellow) or '
                           '[r, g, b(, a)] with channels 0-255')

    def test_not_a_finite_number_is_refused(self):
        assert edit_refusal({"op": "brightness", "factor": math.nan}) == \
            "params.operations[0].factor: must be a finite number"
        assert edit_refusal({"op": "brightness", "factor": math.inf}) == \
            "params.operations[0].factor: must be a finite number"
        assert edit_refusal({"op": "rotate", "degrees": -math.inf}) == \
            "params.operations[0].degrees: must be a finite number"

    @pytest.mark.parametrize("params, path", [
        ({"operations": [{"op": "rotate", "degrees": 10**400}]}, "params.operations[0].degrees"),
        ({"operations": [{"op": "rotate", "degrees": -10**400}]}, "params.operations[0].degrees"),
        ({"operations": [{"op": "resize", "width": 10**400}]}, "params.operations[0].width"),
        ({"operations": [{"op": "crop", "box": [0, 0, 10**400, 5]}]}, "params.operations[0].box"),
        ({"operations": [{"op": "crop", "left": 10**400, "width": 1, "height": 1}]}, "params.operations[0].left"),
        ({"operations": [{"op": "watermark", "text": "x", "color": [10**400, 0, 0]}]}, "params.operations[0].color"),
        ({"quality": 10**400}, "params.quality"),
    ])
    def test_an_integer_beyond_float_range_is_a_validation_error(self, params, path):
        assert refusal(EDIT, params).message.startswith(f"{path}: ")

    def test_unknown_options_are_refused_even_for_operations_without_options(self):
        error = refusal(EDIT, {"operations": [{"op": "auto_orient", "strength": 2}]})
        assert error.details == [{"path": "params.operations[0].strength", "message": "is not a known option",
                                  "type": "extra_forbidden"}]

    def test_null_options_mean_the_default(self):
        spec = normalize_params(EDIT, {"operations": [{"op": "sharpen", "radius": None, "amount": None},
                                                      {"op": "rotate", "degrees": 90, "fill": None}]})
        assert spec["operations"] == [{"op": "sharpen", "radius": 2.0, "amount": 150, "threshold": 3},
                                       {"op": "rotate", "degrees": 90, "expand": True, "fill": None}]

    def test_operation_names_are_forgiving_about_case_and_dashes(self):
        spec = normalize_params(EDIT, {"operations": ["Auto-Orient", {"type": "autoContrast"}, "greyscale",
                                                      {"op": "AUTO_CONTRAST", "cutoff": 1}, "auto-contrast"]})
        assert [op["op"] for op in spec["operations"]] == [
            "auto_orient", "auto_contrast", "grayscale", "auto_contrast", "auto_contrast"]

    def test_choices_are_case_insensitive_with_aliases(self):
        spec = normalize_params(EDIT, {"operations": [{"op": "flip", "direction": "Vertical"},
                                                      {"op": "resize", "width": 5, "fit": "COVER"}], "format": "JPG"})
        assert spec["operations"][0]["direction"] == "vertical" and spec["operations"][1]["fit"] == "cover"
        assert spec["format"] == "jpeg"

    @pytest.mark.parametrize("params, expected", [
        ({"operations": "resize"}, "params.operations: must be a list of at most 50 operations"),
        ({"operations": {"op": "resize"}}, "params.operations: must be a list"),
        ({"operations": ["grayscale"] * (MAX_EDIT_OPERATIONS + 1)}, "params.operations: must be a list of at most 50"),
        ({"operations": [], "format": "gif"}, "params.format: must be 'jpeg', 'png' or 'webp'"),
        ({"operations": [], "quality": 0}, "params.quality: must be greater than or equal to 1"),
        ({"operations": [], "quality": 101}, "params.quality: must be less than or equal to 100"),
        ({"operations": [], "quality": 85.5}, "params.quality: must be a valid integer"),
        ({"operations": [], "quality": "85"}, "params.quality: must be a valid integer"),
        ({"operations": [], "background": "nope"}, "params.background: must be a colour"),
        ({"operations": [], "autoOrient": 1}, "params.autoOrient: must be a valid boolean"),
        ({"operations": [], "auto_orient": "false"}, "params.auto_orient: must be a valid boolean"),
    ])
    def test_top_level_params_are_checked(self, params, expected):
        assert refusal(EDIT, params).message.startswith(expected)

    def test_at_most_50_operations(self):
        assert len(normalize_params(EDIT, {"operations": ["grayscale"] * MAX_EDIT_OPERATIONS})["operations"]) == 50

    def test_no_operations_is_a_plain_re_encode(self):
        assert normalize_params(EDIT, {}) == {"operations": [], "format": None, "quality": 85,
                                              "background": (255, 255, 255, 255), "autoOrient": True}
        assert normalize_params(EDIT, None) == normalize_params(EDIT, {})
        assert normalize_params(EDIT, {"operations": None, "format": "webp"})["format"] == "webp"

    def test_snake_case_and_camel_case_keys(self):
        assert normalize_params(EDIT, {"auto_orient": False})["autoOrient"] is False
        assert normalize_params(EDIT, {"autoOrient": None, "auto_orient": False})["autoOrient"] is False

    def test_unknown_top_level_keys_are_ignored(self):
        assert normalize_params(EDIT, {"operations": [], "clientTag": "x"}) == normalize_params(EDIT, {})
        assert normalize_params(ANALYSIS, {"sleep": 0.1}) == {"paletteSize": 5, "detectFaces": True}
        assert normalize_params(VIDEO, {"fail": True, "sleep": "x"})["duration"] == 4.0

    @pytest.mark.parametrize("task_type", [EDIT, VIDEO, ANALYSIS])
    @pytest.mark.parametrize("params", [["paletteSize"], "x", 5, True])
    def test_params_must_be_an_object(self, task_type, params):
        error = refusal(task_type, params)
        assert error.message == "params: must be an object"

    def test_a_type_without_a_schema_keeps_its_params(self):
        assert normalize_params("something_else", {"a": 1}) == {"a": 1}
        assert normalize_params("something_else", None) == {}
        with pytest.raises(ValidationError):
            normalize_params("something_else", ["a"])
        with pytest.raises(ValueError):
            parse_params("something_else", {})


class TestColors:
    @pytest.mark.parametrize("value, expected", [
        ("#fff", (255, 255, 255, 255)), ("#11223344", (0x11, 0x22, 0x33, 0x44)), ("00ff00", (0, 255, 0, 255)),
        ("#abcd", (0xAA, 0xBB, 0xCC, 0xDD)), (" Red ", (255, 0, 0, 255)),
        ("transparent", (0, 0, 0, 0)), ("White", (255, 255, 255, 255)), ([1, 2, 3], (1, 2, 3, 255)),
        ([1, 2, 3, 4], (1, 2, 3, 4)), ("#12345", None), ([256, 0, 0], None), ([True, 0, 0], None), (7, None),
        ([1.0, 2, 3], None), ([1, 2], None), (None, None),
    ])
    def test_colour_forms(self, value, expected):
        assert parse_color(value) == expected

    def test_colours_are_rgba_tuples_in_the_normalized_params(self):
        spec = normalize_params(VIDEO, {"background": [10, 20, 30]})
        assert spec["background"] == (10, 20, 30, 255) and isinstance(spec["background"], tuple)


class TestVideoParams:
    def test_defaults(self):
        spec = normalize_params(VIDEO, {})
        assert spec == {
            "duration": 4.0, "fps": 25, "width": 1280, "height": 720, "motion": "ken_burns",
            "transition": "crossfade", "transitionDuration": 0.5, "caption": None, "captionPosition": "bottom",
            "captionSize": 0.06, "fit": "cover", "background": (0, 0, 0, 255),
        }
        assert isinstance(spec["duration"], float) and isinstance(normalize_params(VIDEO, {"duration": 3})["duration"],
                                                                  float)

    def test_portrait_and_snake_case_aliases(self):
        spec = normalize_params(VIDEO, {"width": 1080, "height": 1920, "transition_duration": 1.5,
                                        "caption_position": "top", "caption_size": 0.1, "motion": "zoom-in",
                                        "caption": " Hi "})
        assert (spec["width"], spec["height"], spec["transitionDuration"]) == (1080, 1920, 1.5)
        assert spec["captionPosition"] == "top" and spec["motion"] == "zoom_in" and spec["caption"] == "Hi"
        assert spec["captionSize"] == 0.1

    def test_choice_aliases(self):
        assert normalize_params(VIDEO, {"motion": "KenBurns"})["motion"] == "ken_burns"
        assert normalize_params(VIDEO, {"motion": "ken-burns", "transition": "FADE"})["transition"] == "fade"
        assert normalize_params(VIDEO, {"motion": "Pan-Left"})["motion"] == "pan_left"

    def test_a_blank_caption_is_none(self):
        assert normalize_params(VIDEO, {"caption": "   "})["caption"] is None

    def test_the_model_has_the_duration_the_price_reads(self):
        model = parse_params(VIDEO, {"duration": 2.5})
        assert isinstance(model, VideoParams) and model.duration == 2.5
        assert parse_params(VIDEO, None).duration == 4

    @pytest.mark.parametrize("params, expected", [
        ({"duration": 0}, "params.duration: must be greater than 0"),
        ({"duration": -1}, "params.duration: must be greater than 0"),
        ({"duration": 121}, "params.duration: must be less than or equal to 120"),
        ({"duration": "5"}, "params.duration: must be a valid number"),
        ({"duration": True}, "params.duration: must be a valid number"),
        ({"duration": math.nan}, "params.duration: must be a finite number"),
        ({"fps": 0}, "params.fps: must be greater than or equal to 1"),
        ({"fps": 61}, "params.fps: must be less than or equal to 60"),
        ({"fps": 29.97}, "params.fps: must be a valid integer"),
        ({"width": 641, "height": 480}, "params.width: width and height must be even numbers"),
        ({"width": 640, "height": 481}, "params.height: width and height must be even numbers"),
        ({"width": 1920, "height": 1200}, "params.width: width x height must fit 1920x1080 (or 1080x1920)"),
        ({"width": 2560, "height": 1440}, "params.width: must be less than or equal to 1920"),
        ({"width": 16, "height": 16}, "params.width: must be greater than or equal to 32"),
        ({"width": 640}, "params.height: width and height must be given together"),
        ({"height": 640}, "params.width: width and height must be given together"),
        ({"height": 640, "width": None}, "params.width: width and height must be given together"),
        ({"motion": "spin"}, "params.motion: must be 'none', 'zoom_in', 'zoom_out', 'pan_left', 'pan_right' or "
                             "'ken_burns'"),
        ({"transition": "wipe"}, "params.transition: must be 'none', 'crossfade' or 'fade'"),
        ({"transitionDuration": 6}, "params.transitionDuration: must be less than or equal to 5"),
        ({"transition_duration": -1}, "params.transition_duration: must be greater than or equal to 0"),
        ({"captionSize": 0.3}, "params.captionSize: must be less than or equal to 0.2"),
        ({"captionPosition": "left"}, "params.captionPosition: must be 'top', 'center' or 'bottom'"),
        ({"caption": "x" * 201}, "params.caption: must be at most 200 characters"),
        ({"caption": 5}, "params.caption: must be a valid string"),
        ({"fit": "stretch"}, "params.fit: must be 'cover' or 'contain'"),
        ({"background": "#12"}, "params.background: must be a colour"),
        ({"duration": 10**400}, "params.duration: "),
        ({"transitionDuration": 10**400}, "params.transitionDuration: "),
        ({"fps": 10**400}, "params.fps: must be less than or equal to 60"),
    ])
    def test_each_param_is_checked(self, params, expected):
        assert refusal(VIDEO, params).message.startswith(expected)

    def test_the_largest_frames_either_way(self):
        assert normalize_params(VIDEO, {"width": 1920, "height": 1080})["width"] == 1920
        assert normalize_params(VIDEO, {"width": 1080, "height": 1920})["height"] == 1920
        assert normalize_params(VIDEO, {"width": 32, "height": 32})["width"] == 32


class TestAnalysisParams:
    def test_defaults(self):
        assert normalize_params(ANALYSIS, {}) == {"paletteSize": 5, "detectFaces": True}
        assert normalize_params(ANALYSIS, {"palette_size": 16, "detectFaces": False}) == {
            "paletteSize": 16, "detectFaces": False}
        assert normalize_params(ANALYSIS, {"paletteSize": None, "detect_faces": False}) == {
            "paletteSize": 5, "detectFaces": False}
        assert isinstance(parse_params(ANALYSIS, {}), AnalysisParams)

    @pytest.mark.parametrize("params, expected", [
        ({"paletteSize": 0}, "params.paletteSize: must be greater than or equal to 1"),
        ({"paletteSize": 17}, "params.paletteSize: must be less than or equal to 16"),
        ({"paletteSize": 4.0}, "params.paletteSize: must be a valid integer"),
        ({"paletteSize": 10**400}, "params.paletteSize: must be less than or equal to 16"),
        ({"detectFaces": "no"}, "params.detectFaces: must be a valid boolean"),
        ({"detect_faces": 0}, "params.detect_faces: must be a valid boolean"),
    ])
    def test_each_param_is_checked(self, params, expected):
        assert refusal(ANALYSIS, params).message.startswith(expected)


class TestJsonSchema:
    """What /openapi.json shows a frontend: every option, with its range, default and meaning."""

    def test_every_operation_is_in_the_edit_schema(self):
        schema = EditParams.model_json_schema()
        mapping = schema["properties"]["operations"]["items"]["anyOf"][0]["discriminator"]["mapping"]
        assert set(mapping) == set(OPERATION_NAMES) == {
            "resize", "crop", "rotate", "flip", "auto_orient", "grayscale", "brightness", "contrast", "saturation",
            "sharpen", "blur", "auto_contrast", "watermark"}
        for name in OPERATION_NAMES:
            definition = schema["$defs"][mapping[name].rsplit("/", 1)[1]]
            assert definition["properties"]["op"]["const"] == name
            assert definition["additionalProperties"] is False
            assert definition.get("description")
        assert schema["properties"]["operations"]["maxItems"] == MAX_EDIT_OPERATIONS

    def test_the_rotate_degrees_range(self):
        rotate = EditParams.model_json_schema()["$defs"]["RotateOp"]
        degrees = rotate["properties"]["degrees"]
        assert (degrees["minimum"], degrees["maximum"], degrees["type"]) == (-360, 360, "number")
        assert degrees["description"] and "degrees" in rotate["required"]

    def test_options_show_their_defaults_and_descriptions(self):
        schema = EditParams.model_json_schema()
        sharpen = schema["$defs"]["SharpenOp"]["properties"]
        assert sharpen["amount"] == {"default": 150, "description": sharpen["amount"]["description"],
                                     "maximum": 1000, "minimum": 1, "title": "Amount", "type": "integer"}
        assert schema["$defs"]["BlurOp"]["properties"]["radius"]["exclusiveMinimum"] == 0
        assert schema["properties"]["quality"]["default"] == 85
        assert schema["properties"]["autoOrient"]["default"] is True  # camelCase is the canonical key
        for model in (EditParams, VideoParams, AnalysisParams):
            for name, prop in model.model_json_schema()["properties"].items():
                assert prop.get("description"), (model.__name__, name)

    def test_camel_case_keys_in_the_video_and_analysis_schemas(self):
        video = VideoParams.model_json_schema()["properties"]
        assert {"transitionDuration", "captionPosition", "captionSize"} <= set(video)
        assert not {"transition_duration", "caption_position", "caption_size"} & set(video)
        assert video["duration"]["exclusiveMinimum"] == 0 and video["duration"]["maximum"] == 120
        assert video["duration"]["default"] == 4 and video["width"]["default"] == 1280
        assert video["motion"]["enum"] == ["none", "zoom_in", "zoom_out", "pan_left", "pan_right", "ken_burns"]
        analysis = AnalysisParams.model_json_schema()["properties"]
        assert set(analysis) == {"paletteSize", "detectFaces"}
        assert (analysis["paletteSize"]["minimum"], analysis["paletteSize"]["maximum"]) == (1, 16)

    def test_a_colour_is_a_string_or_an_array(self):
        background = VideoParams.model_json_schema()["properties"]["background"]
        assert [form["type"] for form in background["oneOf"]] == ["string", "array"]
        assert background["default"] == "#000000"


class TestInputs:
    @pytest.mark.parametrize("source, expected", [
        ("abc", ("upload", "abc")), (" https://x.test/a.png ", ("url", "https://x.test/a.png")),
        ({"uploadId": " u "}, ("upload", "u")), ({"url": "http://x.test"}, ("url", "http://x.test")),
    ])
    def test_source_forms(self, source, expected):
        assert source_ref(source) == expected

    @pytest.mark.parametrize("source, expected", [
        (5, "input must be an upload id, an http(s) URL, or {uploadId} / {url}"),
        ({"id": "x"}, "input must be an upload id, an http(s) URL, or {uploadId} / {url}"),
        ("", "input must be an upload id or an http(s) URL"),
        ("ftp://x", "input must be an upload id or an http(s) URL"),
        ("x" * 2049, "input must be an upload id or an http(s) URL"),
    ])
    def test_bad_sources_are_a_value_error(self, source, expected):
        with pytest.raises(ValueError) as caught:
            source_ref(source)
        assert str(caught.value) == expected
        with pytest.raises(ValueError, match=r"^input\[3\] must be"):
            source_ref(source, "input[3]")

    def test_sources_of_each_type(self):
        assert input_sources(ANALYSIS, "a") == ["a"]
        assert input_sources(EDIT, ["a", "b"]) == [["a", "b"]]  # one source (refused by source_ref)
        assert input_sources(VIDEO, ["a", "b"]) == ["a", "b"]
        assert input_sources(VIDEO, {"images": ["a"]}) == ["a"]
        assert input_sources(VIDEO, {"uploadId": "a"}) == [{"uploadId": "a"}]

    def test_too_many_images(self):
        with pytest.raises(ValueError, match=f"input must hold 1 to {MAX_VIDEO_IMAGES} sources"):
            input_sources(VIDEO, [f"id-{i}" for i in range(MAX_VIDEO_IMAGES + 1)])
        with pytest.raises(ValueError, match="input must hold 1 to"):
            input_sources(VIDEO, [])
        with pytest.raises(ValueError, match=f"input.images must be a list of 1 to {MAX_VIDEO_IMAGES} sources"):
            input_sources(VIDEO, {"images": "a"})


def test_the_params_models_are_pydantic_models():
    for model in (EditParams, VideoParams, AnalysisParams):
        assert issubclass(model, BaseModel)


class TestCreateTaskRefusesBadParams:
    """Through the API: the 400 body names the failing field by its path."""

    def test_bad_operation_is_a_400_naming_it(self, client, user_headers):
        response = client.simulate_post("/api/tasks/create", headers=user_headers, json={
            "type": "advanced_editing", "input": "00000000-0000-0000-0000-000000000000",
            "params": {"operations": [{"op": "resize", "width": 100}, {"op": "rotate", "degrees": "left"}]},
        })
        assert response.status_code == 400
        assert response.json["statusCode"] == 400 and response.json["code"] == "invalid_params"
        assert "params.operations[1].degrees" in response.json["error"]

    def test_bad_video_size_is_a_400(self, client, user_headers):
        response = client.simulate_post("/api/tasks/create", headers=user_headers, json={
            "type": "video_generation", "input": ["00000000-0000-0000-0000-000000000000"],
            "params": {"duration": 2, "width": 1001, "height": 500},
        })
        assert response.status_code == 400
        assert response.json["code"] == "invalid_params"
        assert "params.width" in response.json["error"] and "even numbers" in response.json["error"]
