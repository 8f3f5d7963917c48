"""The pipeline benchmark's floor: the design's moving parts with none of our work in them.

A Falcon app under the same gunicorn (config, workers, threads, access log) whose
`POST /submit` reads a JSON body and publishes the bare no-op task through a Celery app
with our `celeryconfig`, then answers 201 with a small JSON body. No database, no auth,
no credits. Submitted over HTTP and run by the bare worker, it measures what the
frameworks alone cost on this machine: no implementation of the design can beat it.

    gunicorn --config gunicorn.conf.py 'bench.skeleton_app:wsgi()'   (BENCH_BARE_BROKER set)
"""

from __future__ import annotations

import uuid

import falcon

from . import bare_app


class Submit:
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = req.get_media()
        task_id = str(uuid.uuid4())
        bare_app.app.send_task("bench.noop", args=[0, int(body["total"])], queue=bare_app.QUEUE)
        resp.status = falcon.HTTP_201
        resp.media = {"task": {"id": task_id, "status": "pending"}}


class Health:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}


def wsgi() -> falcon.App:
    app = falcon.App()
    app.add_route("/submit", Submit())
    app.add_route("/health", Health())
    return app
