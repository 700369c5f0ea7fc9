"""The flags, tooltips and README tables generated from the configs' help texts."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from pathlib import Path

import pytest

from spatial_deconv_gui.engines.c2l.config import C2LConfig
from spatial_deconv_gui.engines.destvi.config import DestVIConfig
from spatial_deconv_gui.engines.flash.config import FlashConfig
from spatial_deconv_gui.engines.options import config_options, given_options
from spatial_deconv_gui.engines.perturb.config import PerturbRunConfig, TrainConfig
from spatial_deconv_gui.engines.rctd.config import RCTDConfig
from spatial_deconv_gui.io.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
ALL_CONFIGS = (RCTDConfig, FlashConfig, C2LConfig, DestVIConfig, TrainConfig, PerturbRunConfig)


def _perturb_subparsers() -> dict[str, argparse.ArgumentParser]:
    from spatial_deconv_gui.perturb_cli import add_perturb_parser

    perturb = add_perturb_parser(argparse.ArgumentParser().add_subparsers(dest="command"))
    sub = next(a for a in perturb._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


@pytest.mark.parametrize("config_cls", ALL_CONFIGS, ids=lambda c: c.__name__)
def test_every_config_field_has_a_help_text(config_cls):
    missing = [f.name for f in dataclasses.fields(config_cls) if not (f.metadata or {}).get("help", "").strip()]
    assert not missing


@pytest.mark.parametrize("command, config_cls", [("train", TrainConfig), ("run", PerturbRunConfig)])
def test_perturb_flags_cover_every_config_field_with_its_help(command, config_cls):
    actions = _actions(_perturb_subparsers()[command])
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        assert flag in actions, flag
        assert actions[flag].help.startswith(f.metadata["help"].replace("%", "%%"))
        assert f"(default {f.default})" in actions[flag].help


def test_perturb_flags_keep_their_names_and_defaults():
    parsers = _perturb_subparsers()
    train = parsers["train"].parse_args(["S.h5ad", "--grn", "g.csv", "--cluster-col", "c", "--out", "M"])
    assert given_options(train, TrainConfig) == {}  # nothing typed: TrainConfig's own defaults apply
    cfg = TrainConfig(**given_options(train, TrainConfig))
    assert (
        cfg.radius,
        cfg.contact_radius,
        cfg.scale_factor,
        cfg.l1_reg,
        cfg.group_reg,
        cfg.r2_threshold,
        cfg.ligand_mode,
        cfg.radius_rule,
        cfg.device,
    ) == (None, None, 1.0, 0.05, 0.05, 0.15, "auto", "pair", "auto")
    train = parsers["train"].parse_args(
        [
            "S.h5ad",
            "--grn",
            "g.csv",
            "--cluster-col",
            "c",
            "--out",
            "M",
            "--radius",
            "30",
            "--contact-radius",
            "8",
            "--radius-rule",
            "ligand",
            "--scale-factor",
            "2",
            "--l1-reg",
            "0.1",
            "--group-reg",
            "0.2",
            "--r2-threshold",
            "0.3",
            "--ligand-mode",
            "grid",
            "--device",
            "cpu",
            "--no-standardize",
        ]
    )
    assert given_options(train, TrainConfig) == {
        "radius": 30.0,
        "contact_radius": 8.0,
        "radius_rule": "ligand",
        "scale_factor": 2.0,
        "l1_reg": 0.1,
        "group_reg": 0.2,
        "r2_threshold": 0.3,
        "ligand_mode": "grid",
        "device": "cpu",
        "standardize": False,
    }
    with pytest.raises(SystemExit):
        parsers["train"].parse_args(["S.h5ad", "--grn", "g", "--cluster-col", "c", "--out", "M", "--device", "tpu"])

    run = parsers["run"].parse_args(["M", "--gene", "G", "--output", "o.h5ad"])
    assert given_options(run, PerturbRunConfig) == {}
    cfg = PerturbRunConfig()
    assert (cfg.steps, cfg.ligand_mode, cfg.embedding, cfg.device) == (4, "exact", "spatial", "auto")
    run = parsers["run"].parse_args(
        [
            "M",
            "--gene",
            "G",
            "--output",
            "o.h5ad",
            "--steps",
            "2",
            "--ligand-mode",
            "grid",
            "--embedding",
            "X_umap",
            "--n-grid",
            "20",
        ]
    )
    assert given_options(run, PerturbRunConfig) == {
        "steps": 2,
        "ligand_mode": "grid",
        "embedding": "X_umap",
        "n_grid": 20,
    }


def test_run_method_flags_carry_the_config_help():
    from spatial_deconv_gui.cli import method_parser

    actions = _actions(method_parser(RCTDConfig, "rctd"))
    assert "--device" not in actions  # `run` has its own --device
    for opt in config_options(RCTDConfig, skip=("device",)):
        assert actions[opt.flag].help == f"{opt.help} (default {opt.default})".replace("%", "%%")
    assert not {"--class-df", "--extra"} & set(actions)  # mappings have no flag


def test_gui_tooltips_are_the_config_help_texts():
    from spatial_deconv_gui.engines.registry import available_methods

    for info in available_methods().values():
        _, config_cls = info.load()
        helps = {f.name: f.metadata["help"] for f in dataclasses.fields(config_cls)}
        assert [n for n, _ in info.gui_params] == list(info.gui_options)
        for name, tip in info.gui_params:
            assert tip.lower().rstrip(".") == helps[name].lower().rstrip(".")


def test_readme_option_tables_are_generated_from_the_configs():
    spec = importlib.util.spec_from_file_location("options_tables", ROOT / "scripts" / "options_tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert tables.current_block(readme) == tables.render(), "run python scripts/options_tables.py"
    for config_cls in ALL_CONFIGS:
        for opt in config_options(config_cls):
            assert f"`{opt.flag}`" in tables.render() or opt.name == "device"


def test_the_perturbation_engine_is_in_the_registry_beside_the_methods():
    from spatial_deconv_gui.engines.perturb.train import train
    from spatial_deconv_gui.engines.registry import available_methods, get_method

    assert "perturb" not in available_methods()  # `run --method` and the Deconvolution dock offer deconvolution only
    assert set(available_methods()) >= {"rctd", "flash"}
    info = get_method("perturb", kind="perturbation")
    assert info.load() == (train, TrainConfig)
    assert list(available_methods("perturbation")) == ["perturb"]
    with pytest.raises(InputError, match="unknown method 'perturb'"):
        get_method("perturb")
