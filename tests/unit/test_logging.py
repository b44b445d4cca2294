"""Every module logs under `ray.serve`, so its records get Serve's format and reach the replica
logs and the `serve run` console, with the module's own name for filtering."""

import importlib
import logging
import pkgutil

import serve_app


def test_every_module_logger_is_a_child_of_ray_serve():
    loggers = {}
    for module in pkgutil.walk_packages(serve_app.__path__, "serve_app."):
        name = module.name
        if name.endswith(("__main__", "migrations.env")) or ".versions." in name:
            continue  # running them has side effects; they log nothing
        logger = getattr(importlib.import_module(name), "logger", None)
        if isinstance(logger, logging.Logger):
            loggers[name] = logger.name
    assert len(loggers) >= 10
    wrong = {m: n for m, n in loggers.items() if n != f"ray.serve.{m}"}
    assert wrong == {}
