import os
import shutil
import tempfile

# pytester runs the plugin's example suite in a subprocess (tests/ecosystem).
pytest_plugins = ["pytester"]


def pytest_configure(config):
    # The suite's runtime files, and the logs kept of the daemons its tests kill or fail on
    # purpose, go to a directory of this run's (xdist workers inherit it), removed at the
    # end, so the host's /run/khofs is left as it was.
    if "KHOFS_RUNTIME_DIR" not in os.environ:
        config.khofs_runtime_dir = tempfile.mkdtemp(prefix="khofs-tests-run-")
        os.environ["KHOFS_RUNTIME_DIR"] = config.khofs_runtime_dir


def pytest_unconfigure(config):
    d = getattr(config, "khofs_runtime_dir", None)
    if d:
        del os.environ["KHOFS_RUNTIME_DIR"]
        shutil.rmtree(d, ignore_errors=True)
