"""Models by name: a hub id goes to from_pretrained with the settings passed through."""

from unittest import mock

import pytest
import torch

from fastkd.distill import models


def test_hub_id_goes_to_from_pretrained_with_kwargs():
    with mock.patch.object(models.AutoModelForCausalLM, "from_pretrained") as load:
        models.load_model("org/tiny-instruct", "student", torch.float32, revision="abc123",
                          attn_implementation="sdpa")
    load.assert_called_once_with("org/tiny-instruct", dtype=torch.float32, revision="abc123",
                                 attn_implementation="sdpa")


def test_missing_local_path_is_not_taken_for_an_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="student path"):
        models.load_model(str(tmp_path / "absent"), "student")
