"""The CAM method scripts (Puzzle, OC-CSE, P-OC, P-NOC) end to end, and P-NOC's two-network step (CPU, resnet18)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core import checkpoint, cli, engine, runtime
from core.cam import methods, training
from core.errors import WSSSError
from core.models import Classifier, load_classifier_weights
from scripts.cam import train_occse, train_pnoc, train_poc, train_puzzle

pytestmark = pytest.mark.torch_threads(1)

SCRIPTS = {"puzzle": train_puzzle, "occse": train_occse, "poc": train_poc, "pnoc": train_pnoc}
STEPS = 6  # 24 `train` images of the synthetic tree, global batch 4


@pytest.fixture(scope="module")
def oc_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random-weight resnet18 classifiers standing in for a train_vanilla.py model: 20 classes (VOC) and 5."""
    folder = tmp_path_factory.mktemp("oc")
    paths = {}
    for classes in (20, 5):
        torch.manual_seed(classes)
        paths[str(classes)] = folder / f"oc{classes}.pth"
        torch.save(Classifier("resnet18", classes).state_dict(), paths[str(classes)])
    return paths


def flags(method: str, data_dir: Path, oc_path: Path | None, *extra: str) -> list[str]:
    common = [
        "--tag", f"{method}/r18", "--data_dir", str(data_dir), "--domain_train", "train", "--architecture", "resnet18",
        "--backbone_weights", "none", "--image_size", "64", "--min_image_size", "48", "--max_image_size", "80",
        "--batch_size", "4", "--max_epoch", "1", "--num_workers", "0", "--device", "cpu", "--lr", "0.01",
        "--print_ratio", "0.5",
    ]  # fmt: skip
    if method != "puzzle" and oc_path is not None:
        common += ["--oc-architecture", "resnet18", "--oc-pretrained", str(oc_path)]
    return [*common, *extra]


def parse(method: str, argv: list[str]):
    return SCRIPTS[method].get_args_parser().parse_args(argv)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


# The per-interval log lines average the ramps over steps 0-2 and 3-5 of T = 6 (hand-computed):
# α: min(4·t/3, 4) -> mean(0, 4/3, 8/3) = 4/3, then 4 (P-OC's default --alpha 1: 1/3, then 1);
# a_o: 0.3 + 0.7·t/6 -> 0.3 + 0.7/6 and 0.3 + 0.7·4/6; a_w: 0.5·t/6 -> 0.5/6 and 0.5·4/6.
EXPECTED_TERMS = {
    "puzzle": {"loss", "c_loss", "p_loss", "re_loss", "alpha"},
    "occse": {"loss", "c_loss", "o_loss", "oc_alpha", "k"},
    "poc": {"loss", "c_loss", "p_loss", "re_loss", "alpha", "o_loss", "oc_alpha", "k"},
    "pnoc": {"loss", "c_loss", "p_loss", "re_loss", "alpha", "o_loss", "oc_alpha", "k", "ow", "ot_loss"},
}
EXPECTED_RAMPS = {
    "alpha": {"puzzle": (4 / 3, 4.0), "poc": (1 / 3, 1.0), "pnoc": (4 / 3, 4.0)},
    "oc_alpha": {m: (0.3 + 0.7 / 6, 0.3 + 0.7 * 4 / 6) for m in ("occse", "poc", "pnoc")},
    "ow": {"pnoc": (0.5 / 6, 0.5 * 4 / 6)},
}


@pytest.mark.parametrize("method", list(SCRIPTS))
def test_one_epoch_writes_weights_and_logs_every_term(method, synthetic_voc, oc_weights, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = ("--oc-persist", "true") if method == "pnoc" else ()
    summary = SCRIPTS[method].main(parse(method, flags(method, synthetic_voc, oc_weights["20"], *extra)))

    final = tmp_path / "experiments" / "models" / method / "r18.pth"
    assert Path(summary["final_path"]).resolve() == final.resolve()
    load_classifier_weights(Classifier("resnet18", 20), final)  # strict: the inference-time network
    records = read_metrics(final.with_suffix(""))
    intervals = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in intervals] == [3, 6]
    assert EXPECTED_TERMS[method] <= set(intervals[0])
    assert [r for r in records if r["kind"] == "epoch"][0]["step"] == STEPS
    for key, per_method in EXPECTED_RAMPS.items():
        if method in per_method:
            assert [r[key] for r in intervals] == pytest.approx(per_method[method], abs=1e-9), key
    if "k" in intervals[0]:
        assert intervals[0]["k"] == 1.0
    assert all(0.0 < summary[f"train/{term}"] < 10.0 for term in EXPECTED_TERMS[method] - {"alpha", "k", "ow"})

    oc_file = final.with_name("r18-oc.pth")
    assert oc_file.exists() == (method == "pnoc")
    if method == "pnoc":  # the adversary was trained: its weights left the initial checkpoint
        initial, trained = weights(oc_weights["20"]), weights(oc_file)
        assert set(initial) == set(trained)
        assert not torch.equal(initial["classifier.weight"], trained["classifier.weight"])


# -- P-NOC's step, on the core functions ----------------------------------------------------------------------------
def pnoc_context(tmp_path: Path, synthetic_voc: Path, oc_path: Path, *extra: str):
    args = parse("pnoc", flags("pnoc", synthetic_voc, oc_path, *extra))
    run = runtime.setup(args, "cam", models_dir=tmp_path / "models")
    ctx = engine.TrainContext(run, steps_per_epoch=STEPS)
    torch.manual_seed(0)
    training.add_trained_classifier(ctx, "cg", Classifier("resnet18", 20), args)
    oc = methods.build_ordinary_classifier(args, 20, trainable=True)
    training.add_trained_classifier(ctx, "oc", oc, args, lr_alpha=args.lr_alpha_oc, max_grad_norm=None, ema=False)
    ctx.train_mode()
    spec = methods.method_spec("pnoc", args, methods.build_label_splitter(args, 20))
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 64, generator=generator)
    labels = torch.tensor([[1.0, 0, 1] + [0] * 17, [0, 1.0] + [0] * 18])
    return run, ctx, spec, images, labels


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


@pytest.mark.parametrize("leak", [False, True])
def test_generator_step_leaks_gradient_into_the_oc_only_when_asked(leak, synthetic_voc, oc_weights, tmp_path):
    leak_flag = ("--oc-grad-leak", str(leak).lower())
    run, ctx, spec, images, labels = pnoc_context(tmp_path, synthetic_voc, oc_weights["20"], *leak_flag)
    try:
        oc, cg = ctx.module("oc"), ctx.module("cg")
        oc_before, cg_before = snapshot(oc), snapshot(cg)
        trainable = [n for n, p in oc.named_parameters() if p.requires_grad]  # convs and head (BN frozen: mode fix)
        scalars, maps, term = methods.generator_step(ctx, images, labels, 3, spec)  # t = 3 of T = 6

        assert maps.shape == (2, 20, 4, 4) and not maps.requires_grad
        assert term is not None and term.chosen.sum(dim=1).tolist() == [1.0, 1.0]
        values = methods.to_floats(scalars)
        # α = min(4·3/(0.5·6), 4) = 4, a_o = 0.3 + 0.7·3/6 = 0.65; L_cg = L_c + L_p + α·L_re + a_o·L_o
        assert (values["alpha"], values["oc_alpha"], values["k"]) == pytest.approx((4.0, 0.65, 1.0))
        expected = values["c_loss"] + values["p_loss"] + 4.0 * values["re_loss"] + 0.65 * values["o_loss"]
        assert values["loss"] == pytest.approx(expected, rel=1e-5) and min(values.values()) > 0
        grads = [p.grad for p in oc.parameters() if p.requires_grad]
        assert len(trainable) == 21 and trainable == [n for n, p in oc.named_parameters() if p.requires_grad]
        if leak:
            assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
        else:
            assert all(g is None for g in grads)
        assert changed(cg_before, cg)  # the generator stepped ...
        assert not changed(oc_before, oc)  # ... but a generator step never moves the OC, leak or not

        cg_after = snapshot(cg)
        inputs = methods.adversary_inputs(images, maps, term, spec.adversary)
        erased = (inputs == 0).all(dim=1)  # hard mask: erased pixels are exactly 0 (the mean colour)
        assert 0 < int(erased.sum()) < erased.numel() and not inputs.requires_grad
        ot_loss = methods.pnoc_oc_step(ctx, inputs, labels, 1.0, spec.class_loss)
        assert float(ot_loss) > 0
        assert changed(oc_before, oc) and not changed(cg_after, cg)
        assert all(p.grad is None for p in oc.parameters())  # the OC step consumed (and cleared) its gradients
    finally:
        run.close()


# -- user errors -----------------------------------------------------------------------------------------------------
def run_cli(method: str, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.run(SCRIPTS[method].main, SCRIPTS[method].get_args_parser(), argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


def test_missing_or_mismatching_oc_checkpoint_is_a_one_line_error(
    synthetic_voc, oc_weights, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    err = run_cli("pnoc", flags("pnoc", synthetic_voc, None), capsys)
    assert err.startswith("error: --oc-pretrained is required") and "train_vanilla.py" in err
    err = run_cli("occse", flags("occse", synthetic_voc, tmp_path / "missing.pth"), capsys)
    assert "missing.pth does not exist" in err and "train_vanilla.py" in err
    assert not (tmp_path / "experiments").exists()  # checked before any folder is created

    err = run_cli("poc", flags("poc", synthetic_voc, oc_weights["5"]), capsys)
    assert "oc5.pth holds a 5-class resnet18" in err and "must be a 20-class resnet18 classifier" in err


def test_unimplemented_options_are_refused(synthetic_voc, oc_weights, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = run_cli("puzzle", flags("puzzle", synthetic_voc, None, "--augment", "colorjitter_cutmix"), capsys)
    assert "cutmix is not implemented" in err
    argv = flags("puzzle", synthetic_voc, None, "--loss_option", "cl_pcl_re_conf", "--overwrite", "true")
    err = run_cli("puzzle", argv, capsys)
    assert "conf not implemented" in err
    with pytest.raises(SystemExit):
        parse("pnoc", flags("pnoc", synthetic_voc, oc_weights["20"], "--regularization", "orthogonal"))


# -- resume ---------------------------------------------------------------------------------------------------------
def test_pnoc_resume_gives_the_weights_of_an_uninterrupted_run(synthetic_voc, oc_weights, tmp_path, monkeypatch):
    # Epochs of 6 steps end in the middle of a 4-step accumulation, and with the gradient leak the OC holds pending
    # gradients from both networks' losses at the interruption: all of it must survive the restart.
    extra = ("--max_epoch", "2", "--accumulate_steps", "4", "--oc-grad-leak", "true", "--oc-persist", "true")
    argv = flags("pnoc", synthetic_voc, oc_weights["20"], *extra)

    for folder in ("straight", "resumed"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path / "straight")
    straight = train_pnoc.main(parse("pnoc", argv))

    save = engine.state.save_checkpoint

    def save_then_die(ctx: engine.TrainContext) -> None:
        save(ctx)
        if ctx.epoch == 1:
            raise KeyboardInterrupt  # the job is killed right after the first epoch's checkpoint

    monkeypatch.chdir(tmp_path / "resumed")
    monkeypatch.setattr(engine.state, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_pnoc.main(parse("pnoc", argv))
    state = checkpoint.load(Path("experiments/models/pnoc/r18/last.pth"))
    assert state["epoch"] == 1 and state["pending_grads"]["oc"] and "label_splitter" in state["states"]
    monkeypatch.setattr(engine.state, "save_checkpoint", save)
    resumed = train_pnoc.main(parse("pnoc", [*argv, "--resume", "true"]))

    for key in ("final_path", "oc_path"):
        a, b = weights(Path(straight[key])), weights(Path(resumed[key]))
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (key, name)
    choices = [
        checkpoint.load(root / "experiments/models/pnoc/r18/last.pth")["states"]["label_splitter"]["choices"]
        for root in (tmp_path / "straight", tmp_path / "resumed")
    ]
    assert torch.equal(*choices) and float(choices[0].sum()) == 20 + 2 * 24  # 1 per class + 1 per image
    assert resumed["train/ot_loss"] == straight["train/ot_loss"]


def test_method_spec_rejects_unknown_methods_and_missing_splitter(synthetic_voc, oc_weights):
    args = parse("pnoc", flags("pnoc", synthetic_voc, oc_weights["20"]))
    with pytest.raises(ValueError, match="unknown method"):
        methods.method_spec("cutmix", args)
    with pytest.raises(ValueError, match="LabelSplitter"):
        methods.method_spec("occse", args)
    spec = methods.method_spec("poc", args, methods.build_label_splitter(args, 20))
    assert spec.adversary is None and spec.puzzle is not None and spec.puzzle.alpha == methods.Ramp(0.0, 4.0, 0.5)
    no_interval = parse("pnoc", flags("pnoc", synthetic_voc, None, "--oc-train-interval-steps", "0"))
    with pytest.raises(WSSSError, match="interval"):
        methods.method_spec("pnoc", no_interval, methods.build_label_splitter(no_interval, 20))
