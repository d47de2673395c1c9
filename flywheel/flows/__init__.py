"""Prefect flows and deployments: parameters, tasks and wiring; the methods live elsewhere."""

import logging

# Progress lines of the methods (chunk k/n done) reach the run logs through Prefect's
# extra_loggers setting (prefect.toml); the logger must pass INFO for that.
logging.getLogger("flywheel").setLevel(logging.INFO)
