"""Loading never executes code from a model folder: pickles are read with weights_only, remote code is off."""
from __future__ import annotations

import json
import pickle

import pytest

from advisor.models.errors import AdvisorError
from advisor.models.loading import load
from tests.conftest import tiny_model


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would run: open(marker, "w")
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_not_executed(tmp_path, tiny_tokenizer):
    folder = tmp_path / "evil-bin"
    folder.mkdir()
    model = tiny_model("llama")
    model.config.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    marker = tmp_path / "pwned"
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Evil(marker)}, f)
    with pytest.raises(AdvisorError) as e:
        load(str(folder))
    assert not marker.exists(), "a pickle in the model folder was executed"
    assert "weights_only=True" in str(e.value), str(e.value)


def test_remote_code_is_not_run_unless_asked(tmp_path, tiny_tokenizer):
    folder = tmp_path / "evil-remote"
    folder.mkdir()
    tiny_tokenizer.save_pretrained(folder)
    marker = tmp_path / "pwned-remote"
    cfg = tiny_model("llama").config.to_dict()
    cfg.update(model_type="evil", auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                                            "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(AdvisorError) as e:
        load(str(folder))
    assert not marker.exists(), "code from the model folder ran without --trust-remote-code"
    assert "trust-remote-code" in str(e.value), str(e.value)
