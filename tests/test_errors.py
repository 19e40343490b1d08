"""kvpass.errors: kvpass's exceptions reach the caller as raised, through Dynamo, catchable by their documented type."""

import pytest
import torch
from conftest import tiny_model

import kvpass


def test_a_bad_option_is_an_option_error_at_the_first_forward_not_a_backend_failure():
    model = tiny_model()
    forward = torch.compile(model.forward, backend="kvpass", options={"policy": "h2o", "budget": -5})
    with pytest.raises(kvpass.OptionError, match="'budget' must be a positive integer, got -5") as err:
        forward(input_ids=torch.randint(1, 128, (1, 8)))
    assert isinstance(err.value, ValueError)  # `except ValueError` catches it too
    assert not isinstance(err.value, torch._dynamo.exc.BackendCompilerFailed)
    assert "report" not in str(err.value).lower()  # no "report a bug to PyTorch" footer
    with pytest.raises(kvpass.OptionError, match="unknown policy 'h3o'"):
        kvpass.parse_options({"policy": "h3o", "budget": 8})  # checked at once, before any compile


def test_a_graph_without_attention_is_unsupported_graph_as_raised():
    forward = torch.compile(lambda x: torch.softmax(x, -1) * 2, backend="kvpass", options={"budget": 8})
    with pytest.raises(kvpass.UnsupportedGraph, match="kvpass") as err:
        forward(torch.randn(2, 4))
    assert isinstance(err.value, kvpass.KVPassError) and isinstance(err.value, ValueError)
