"""Zoo training on tiny recipes: loss falls, folders load everywhere, same seed -> same weights."""
from __future__ import annotations

import json
import math

import pytest
import torch

from advisor.models.zoo.configs import Recipe
from advisor.models.zoo.train import batch_order, lr_at, save_model, train


def tiny(family: str = "llama", **kw) -> Recipe:
    base = dict(name=f"{family}-tiny", family=family, size="tiny", variant="long", d_model=32, n_layers=1,
                n_heads=1, d_ff=64, seq_len=64, batch_size=4, steps=40, lr=1e-2, warmup_steps=4,
                data="stdlib-code:calib")
    base.update(kw)
    return Recipe(**base)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("advisor_home")
    mp.setenv("ADVISOR_HOME", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def trained(home):
    return train(tiny(), progress=False)


def test_lr_schedule_warms_up_then_decays_to_floor():
    r = tiny(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(s, r) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_batch_order_is_seeded_and_non_overlapping_within_an_epoch():
    r = tiny(steps=10, batch_size=3, seq_len=8)
    a = torch.cat(list(batch_order(8 * 30, r)))
    b = torch.cat(list(batch_order(8 * 30, r)))
    assert torch.equal(a, b)
    assert len(set(a.tolist())) == 30 and all(o % 8 == 0 for o in a.tolist())  # 30 distinct chunks = one epoch
    c = torch.cat(list(batch_order(8 * 30, tiny(steps=10, batch_size=3, seq_len=8, seed=1))))
    assert not torch.equal(a, c)


def test_tiny_training_loss_falls(trained):
    first = sum(trained.losses[:4]) / 4
    last = sum(trained.losses[-4:]) / 4
    assert first == pytest.approx(math.log(4096), abs=0.3)  # starts near uniform over the vocabulary
    assert last < first - 1.0, trained.losses


def test_same_seed_gives_bitwise_identical_weights(trained, home):
    again = train(tiny(), progress=False)
    a, b = trained.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert trained.losses == again.losses
    other = train(tiny(seed=1, steps=2), progress=False)
    assert not torch.equal(other.model.state_dict()["lm_head.weight"], a["lm_head.weight"])


def test_saved_folder_loads_with_transformers_and_advisor(trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from advisor.cli import main
    from advisor.models.loading import load

    folder = save_model(trained, tmp_path / "llama-tiny")
    assert (folder / "model.safetensors").is_file() and not (tmp_path / "llama-tiny.partial").exists()
    assert Recipe.from_dict(json.loads((folder / "recipe.json").read_text())) == trained.recipe
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    for k, v in trained.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    ids = tok("import os\n", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], 4096)
    loaded = load(str(folder))
    assert loaded.family == "llama" and len(loaded.adapter.blocks()) == 1
    assert main(["eval", "--model", str(folder), "--data", "stdlib-code", "--seq-len", "64", "--max-windows", "3",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert math.isfinite(out["ppl"]) and out["ppl"] < 4096


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_other_families_train_save_and_load(family, home, tmp_path):
    from advisor.models.loading import load

    result = train(tiny(family, steps=3), progress=False)
    folder = save_model(result, tmp_path / family)
    loaded = load(str(folder))
    assert loaded.family == family and loaded.model.config.model_type == family
    assert any(name.endswith("bias") for name, _ in loaded.model.named_parameters())
    groups = loaded.adapter.linear_groups(loaded.adapter.blocks()[0])
    assert len(groups) == 4


def test_build_records_results_and_resumes(home, tmp_path):
    from advisor.models.zoo.build import build, model_dir
    from advisor.models.zoo.manifest import load_manifest, manifest_models

    manifest_path = tmp_path / "manifest.json"
    recipe = tiny(steps=20)
    [first] = build([recipe], write_manifest=True, manifest_path=manifest_path, progress=False)
    assert first["status"] == "trained" and first["path"] == str(model_dir(recipe.name))
    entry = manifest_models(load_manifest(manifest_path))[recipe.name]
    assert entry["eval_ppl"] < 4096 and entry["unigram_ppl"] < 4096 and entry["train_tokens"] == 20 * 4 * 64
    assert load_manifest(manifest_path)["eval"]["n_windows"] == 40
    [again] = build([recipe], manifest_path=manifest_path, progress=False)  # resumable: present, not retrained
    assert again["status"] == "present" and again["weights_sha256"] == entry["weights_sha256"]
    [forced] = build([recipe], force=True, manifest_path=manifest_path, progress=False)
    assert forced["status"] == "trained" and forced["weights_sha256"] == entry["weights_sha256"]
    assert forced["eval_ppl"] == entry["eval_ppl"]
