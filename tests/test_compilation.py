import pytest
import torch
from torch import nn

from bmojo.compilation import compile_static


@pytest.mark.requires_cxx
def test_compiled_module_shares_the_weights_and_computes_the_same():
    torch.compiler.reset()
    module = nn.Linear(4, 3)
    compiled = compile_static(module, torch.device("cpu"), "--compile")
    x = torch.randn(2, 4)
    torch.testing.assert_close(compiled(x), module(x))
    assert compiled.weight is module.weight


def test_without_a_cxx_compiler_the_error_names_the_option(monkeypatch):
    from torch._inductor import cpp_builder
    from torch._inductor.exc import InvalidCxxCompiler

    def no_compiler():
        raise InvalidCxxCompiler

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(ValueError, match="^compile=True: torch.compile on CPU needs a C\\+\\+ compiler"):
        compile_static(nn.Linear(4, 3), torch.device("cpu"), "compile=True")
