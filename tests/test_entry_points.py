"""The console scripts of pyproject.toml: each names a function that exists.

(pip writes a script calling ``module:function()``; the commands themselves run in the tests of
what they do, as ``python -m module``.)
"""

import importlib
import tomllib

import pytest

from tests.conftest import REPO

with open(f"{REPO}/pyproject.toml", "rb") as f:
    SCRIPTS = tomllib.load(f)["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_target_is_callable(name):
    module, _, function = SCRIPTS[name].partition(":")
    assert callable(getattr(importlib.import_module(module), function)), SCRIPTS[name]
