# pytester runs the plugin's example suite in a subprocess (tests/ecosystem).
pytest_plugins = ["pytester"]
