"""gunicorn settings for the `web` process (Procfile), read from the environment so the
same file serves `make run` and a deployment."""

import os

from logconfig import default_format, gunicorn_logconfig
from metrics_dir import use_multiprocess_dir

# Prometheus multiprocess mode: every worker writes its metrics here, /metrics merges them.
use_multiprocess_dir("api")


def post_request(worker, req, environ, resp):
    # After the access line: the next request on this connection starts with no context
    # (a malformed one never reaches the app that would set it).
    import logconfig

    for var in logconfig.CONTEXT.values():
        var.set(None)


def child_exit(server, worker):
    from metrics import process_gone

    process_gone(worker.pid)

# Platforms route to $PORT on every interface; `make run` sets BIND_HOST=127.0.0.1 because
# its development JWT secret is public and must not be reachable from the network.
bind = [f"{os.environ.get('BIND_HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"]

# WEB_CONCURRENCY is the name platforms (Heroku, Render) already set from the dyno's size.
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# gevent: each connection is a greenlet, so clients that trickle their headers or body (a
# bad link, or an attacker) hold a few kilobytes each, not one of a handful of threads, and
# long requests (waiting on a task) cost as little. psycopg 3 and redis-py cooperate with
# gevent's patched sockets; nothing in a request burns CPU for long (media work is queued).
worker_class = "gevent"
worker_connections = int(os.environ.get("WEB_CONNECTIONS", "1000"))

# A worker that has not checked in with the master for `timeout` seconds is killed and
# replaced; requests never wait on media work (that is the queue's job), so this is generous.
timeout = int(os.environ.get("WEB_TIMEOUT", "60"))
# On SIGTERM, in-flight requests get this long to finish before workers are killed.
graceful_timeout = 10
# With async workers this is also the most a client may take to send a request's line and
# headers (gunicorn reads them under a gevent.Timeout of `keepalive` seconds), so a client
# that trickles its headers is disconnected after it; an idle kept-alive connection too.
keepalive = int(os.environ.get("WEB_KEEPALIVE", "5"))

accesslog = "-"
errorlog = "-"
# gunicorn's own lines in the service's format (JSON outside development).
logconfig_dict = gunicorn_logconfig(default_format(os.environ.get("APP_ENV") or "production",
                                                   (os.environ.get("LOG_FORMAT") or "").strip().lower() or None))
# The response's X-Request-ID ties an access line to what a client reports.
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms rid=%({x-request-id}o)s'

# The default control socket ($HOME/.gunicorn/gunicorn.ctl) is one per user, shared by every
# gunicorn they run; `make run` keeps its own under its var directory.
if os.environ.get("STUDIOX_VAR_DIR"):
    control_socket = os.path.join(os.environ["STUDIOX_VAR_DIR"], "gunicorn.ctl")
