"""The pytest plugin's old module name: it is microvmm/testing/plugin.py.

Kept for installs whose `pytest11` entry point still names this module, and
for `import microvmm.pytest_plugin`: both get the plugin module itself (one
module object, so pytest registers its hooks and fixtures once)."""

import sys

from microvmm.testing import plugin as _plugin

sys.modules[__name__] = _plugin
