"""bmojo.ops.triton_support: triton at a version the kernels run with."""

from __future__ import annotations

import sys
import types

import pytest

from bmojo.ops.triton_support import require_triton


@pytest.mark.parametrize(("version", "usable"), [("3.3.1", False), ("3.4.0", True), ("3.10.0+git1234", True)])
def test_triton_older_than_the_kernels_need_is_named(version, usable, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__=version))
    if usable:
        assert require_triton("the kernels").__version__ == version
    else:
        with pytest.raises(ImportError, match=f"^triton {version} is too old for the kernels: it needs >= 3.4$"):
            require_triton("the kernels")
