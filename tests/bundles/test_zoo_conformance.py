# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""The generation bundles checked as the model zoo's CI and MONAI Label check a bundle, plus two cross-bundle checks.

Generation bundles (MRI, CT): ``verify_metadata`` against the schema their metadata names (vendored in
``tests/schemas``), metadata shapes against the configs, MONAI's train and infer ``check_properties``,
``train#trainer#max_epochs`` changing the run length, ``verify_net_in_out`` and ``ckpt_export`` +
``torch.jit.load`` of the denoiser (scripted) and the autoencoder (traced).

Every bundle: JSON formatted as the zoo's pre-commit hook wants (``pretty-format-json --indent=4
--no-sort-keys``), and every command in the README files resolving (config files, ids, make targets,
``meddiff`` subcommands and their options).
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import re
import shlex
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export, verify_metadata, verify_net_in_out
from monai.bundle.reference_resolver import ReferenceResolver
from monai.data import load_net_with_metadata

from meddiff.cli.format_json import find_json_files, format_json_files, pretty_json
from meddiff.cli.main import COMMANDS, main
from meddiff.engines import Trainer, TrainerSettings, VQGANTrainer
from tests.bundles.conftest import ct_phantom, write_mixed_mri_dataset
from tests.helpers import TINY_VALUES, tiny_autoencoder

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO / "tests" / "schemas"
GENERATION = [REPO / "bundles" / "mri_generative_diffusion", REPO / "bundles" / "ct_generative_diffusion"]
ALL_BUNDLES = sorted(p.parent.parent for p in (REPO / "bundles").glob("*/configs/metadata.json"))
INFERENCE = ["common", "train_autoencoder", "inference"]
STAGES = {"train_autoencoder": ["common", "train_autoencoder"],
          "train_diffusion": ["common", "train_autoencoder", "train_diffusion"]}


def _files(bundle: Path, names: list[str]) -> list[str]:
    return [str(bundle / "configs" / f"{n}.json") for n in names]


def _parser(bundle: Path, names: list[str], overrides: dict[str, Any] | None = None) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(_files(bundle, names))
    parser.update(overrides or {})
    return parser


def _narrow(bundle: Path) -> dict[str, Any]:
    """Narrow widths with the shipped configs' structure (levels, downsampling), so shapes stay the metadata's."""
    parser = _parser(bundle, INFERENCE)
    return {"unet_channels": [8] * len(parser["unet_channels"]), "unet_head_channels": 8, "unet_res_blocks": 1,
            "autoencoder_channels": [8] * len(parser["autoencoder_channels"]), "autoencoder_res_layers": 1,
            "codebook_size": 32, "discriminator_channels": 8}


def _meta(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "configs" / "metadata.json").read_text())


def _randomise(net: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero weights everywhere (the denoiser's output conv starts at zero, which would hide differences)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


# -- metadata ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bundle", GENERATION, ids=lambda p: p.name)
def test_metadata_verifies_against_the_schema_it_names(bundle):
    meta = _meta(bundle)
    schema = SCHEMAS / meta["schema"].rsplit("/", 1)[-1]
    assert schema.is_file(), f"{bundle.name} names {meta['schema']}, which is not vendored in {SCHEMAS}"
    assert "generator_ldm" in schema.name, "a latent diffusion bundle names the zoo's generator-LDM schema"
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(schema))
    assert meta["version"] in meta["changelog"], "the current version needs a changelog entry"
    newest = max(meta["changelog"], key=lambda v: tuple(int(x) for x in v.split(".")))
    assert meta["version"] == newest, "version must be the newest changelog entry"


@pytest.mark.parametrize("bundle", GENERATION, ids=lambda p: p.name)
def test_metadata_shapes_are_the_configs_and_the_networks(bundle):
    """autoencoder image -> latent (generator and denoiser formats) agree with the configs and the real networks."""
    meta = _meta(bundle)
    parser = _parser(bundle, INFERENCE)
    size = list(parser["spatial_size"])
    factor = 2 ** len(parser["autoencoder_channels"])
    latent = [s // factor for s in size]
    channels = parser["embedding_dim"]
    ae_in, ae_out = meta["autoencoder_data_format"]["inputs"]["image"], meta["autoencoder_data_format"]["outputs"]["pred"]
    gen_in, gen_out = meta["generator_data_format"]["inputs"]["latent"], meta["generator_data_format"]["outputs"]["pred"]
    net_in, net_out = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
    for fmt in (ae_in, ae_out):
        assert (fmt["num_channels"], fmt["spatial_shape"]) == (parser["image_channels"], size)
    for fmt in (gen_in, gen_out, net_in, net_out):
        assert (fmt["num_channels"], fmt["spatial_shape"]) == (channels, latent)
    assert meta["network_data_format"]["inputs"]["timesteps"]["value_range"] == [0, parser["num_train_timesteps"] - 1]

    parser.update(_narrow(bundle))
    autoencoder = parser.get_parsed_content("autoencoder_def").eval()
    with torch.no_grad():
        z = autoencoder.encode_stage_2_inputs(torch.zeros(1, ae_in["num_channels"], *ae_in["spatial_shape"]))
        assert list(z.shape) == [1, gen_in["num_channels"], *gen_in["spatial_shape"]]
        assert list(autoencoder.decode_stage_2_outputs(z).shape) == [1, ae_out["num_channels"], *ae_out["spatial_shape"]]


@pytest.mark.parametrize("bundle", GENERATION, ids=lambda p: p.name)
def test_verify_net_in_out_on_the_denoiser(bundle):
    """The zoo CI's data-shape check of network_def (narrow widths; the real widths run in the slow test below)."""
    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs" / "metadata.json"),
                      config_file=_files(bundle, INFERENCE), device="cpu",
                      extra_forward_args={"timesteps": torch.tensor([7])}, **_narrow(bundle))
    wrong_channels = {"_meta_#network_data_format#outputs#pred#num_channels": 3, **_narrow(bundle)}
    with pytest.raises(ValueError, match="output channel number"):
        verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs" / "metadata.json"),
                          config_file=_files(bundle, INFERENCE), device="cpu",
                          extra_forward_args={"timesteps": torch.tensor([7])}, **wrong_channels)


@pytest.mark.slow
@pytest.mark.parametrize("bundle", GENERATION, ids=lambda p: p.name)
def test_verify_net_in_out_on_the_shipped_denoiser_size(bundle):
    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs" / "metadata.json"),
                      config_file=_files(bundle, INFERENCE), device="cpu",
                      extra_forward_args={"timesteps": torch.tensor([7])})


# -- TorchScript --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bundle", GENERATION, ids=lambda p: p.name)
def test_ckpt_export_scripts_the_denoiser(bundle, tmp_path):
    narrow = _narrow(bundle)
    net = _parser(bundle, INFERENCE, narrow).get_parsed_content("network_def")
    _randomise(net)
    torch.save(net.state_dict(), tmp_path / "diffusion_model.pt")
    ckpt_export(net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(tmp_path / "diffusion_model.pt"),
                meta_file=str(bundle / "configs" / "metadata.json"), config_file=_files(bundle, INFERENCE),
                bundle_root=str(bundle), **narrow)
    scripted, meta, _ = load_net_with_metadata(str(tmp_path / "model.ts"))
    assert isinstance(scripted, torch.jit.ScriptModule)
    assert meta["version"] == _meta(bundle)["version"]
    shape = _meta(bundle)["network_data_format"]["inputs"]["image"]
    net.eval()
    with torch.no_grad():
        for x, t in ((torch.randn(2, shape["num_channels"], *shape["spatial_shape"]), torch.tensor([3, 250])),
                     (torch.randn(1, shape["num_channels"], 16, 8, 5), torch.tensor(40))):  # other sizes script too
            expected = net(x, t)
            assert expected.abs().mean() > 1e-3
            torch.testing.assert_close(scripted(x, t), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bundle", GENERATION, ids=lambda p: p.name)
def test_ckpt_export_traces_the_autoencoder(bundle, tmp_path):
    """MONAI's VQVAE does not script (see docs/README.md, "TorchScript"); ckpt_export's tracing mode works."""
    narrow = _narrow(bundle)
    autoencoder = _parser(bundle, INFERENCE, narrow).get_parsed_content("autoencoder_def")
    _randomise(autoencoder, seed=1)
    torch.save(autoencoder.state_dict(), tmp_path / "autoencoder.pt")
    size = 2 ** len(narrow["autoencoder_channels"]) * 2
    ckpt_export(net_id="autoencoder_def", filepath=str(tmp_path / "autoencoder.ts"),
                ckpt_file=str(tmp_path / "autoencoder.pt"), meta_file=str(bundle / "configs" / "metadata.json"),
                config_file=_files(bundle, INFERENCE), bundle_root=str(bundle), use_trace=True,
                input_shape=[1, 1, size, size, size], **narrow)
    traced = torch.jit.load(str(tmp_path / "autoencoder.ts"))
    autoencoder.eval()
    x = torch.rand(1, 1, size, size, size) * 2 - 1
    with torch.no_grad():
        (recon, q_loss), (recon_ts, q_loss_ts) = autoencoder(x), traced(x)
    assert recon.shape == x.shape and recon.abs().mean() > 1e-3
    torch.testing.assert_close(recon_ts, recon, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(q_loss_ts, q_loss, rtol=1e-4, atol=1e-6)


# -- MONAI workflow properties ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo_data")
    ct = root / "ct"
    ct.mkdir()
    for i in range(4):
        nib.save(nib.Nifti1Image(ct_phantom(seed=i), np.diag([3.0, 3.0, 3.0, 1.0])), ct / f"ct-{i}.nii.gz")
    return {"mri_generative_diffusion": write_mixed_mri_dataset(root / "mri"), "ct_generative_diffusion": ct}


def _workflow(bundle: Path, names: list[str], workflow_type: str, root: Path, data: Path, **override: Any
              ) -> ConfigWorkflow:
    return ConfigWorkflow(config_file=_files(bundle, names), workflow_type=workflow_type, logging_file=False,
                          bundle_root=str(root), dataset_dir=str(data), **{**TINY_VALUES, **override})


def _write_autoencoder_weights(bundle: Path, ckpt_dir: Path) -> None:
    """Stage-1 weights as the trainer writes them (a plain state_dict), from the config's own definition."""
    autoencoder = _parser(bundle, STAGES["train_autoencoder"], TINY_VALUES).get_parsed_content("autoencoder_def")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.save(autoencoder.state_dict(), ckpt_dir / "autoencoder.pt")


@pytest.mark.parametrize("bundle", GENERATION, ids=lambda p: p.name)
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_training_configs_have_monai_train_properties(bundle, stage, datasets, tmp_path):
    if stage == "train_diffusion":
        _write_autoencoder_weights(bundle, tmp_path / "models")
    workflow = _workflow(bundle, STAGES[stage], "train", tmp_path, datasets[bundle.name])
    workflow.initialize()
    assert workflow.check_properties() == []
    trainer = workflow.trainer
    assert isinstance(trainer, Trainer)
    # the properties are the objects the trainer uses, so setting them (as MONAI Label does) changes the run
    assert workflow.train_inferer is trainer.inferer
    assert workflow.train_dataset is trainer.train_loader.dataset
    assert workflow.train_preprocessing is workflow.train_dataset.transform
    assert workflow.val_dataset is trainer.val_loader.dataset
    assert workflow.max_epochs is None and trainer.max_steps == workflow.parser["max_steps"]

    workflow = _workflow(bundle, STAGES[stage], "train", tmp_path, datasets[bundle.name],
                         **{"train#trainer#max_epochs": 3})
    workflow.initialize()
    trainer = workflow.trainer
    assert trainer.max_steps == 3 * len(trainer.train_loader) != workflow.parser["max_steps"]


def test_max_epochs_set_as_monai_label_does_sets_the_run_length(datasets, tmp_path):
    """``workflow.max_epochs = 2`` then ``run()``: two passes over the training set, whatever max_steps says."""
    bundle = GENERATION[0]
    workflow = _workflow(bundle, STAGES["train_autoencoder"], "train", tmp_path, datasets[bundle.name],
                         max_steps=1000, val_interval=1000, ckpt_interval=1000)
    workflow.max_epochs = 2
    workflow.initialize()
    num_batches = len(workflow.parser.get_parsed_content("train#dataloader"))
    assert num_batches >= 2
    workflow.run()
    summary = json.loads((tmp_path / "models" / "autoencoder_summary.json").read_text())
    assert summary["steps"] == 2 * num_batches
    logged = [json.loads(line) for line in (tmp_path / "models" / "autoencoder_log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in logged) == 2 * num_batches


def _inference_workflow(bundle: Path, root: Path, data: Path) -> ConfigWorkflow:
    """The inference workflow over stage-1 and stage-2 files written as the trainers write them."""
    ckpt_dir = root / "models"
    _write_autoencoder_weights(bundle, ckpt_dir)
    workflow = _workflow(bundle, INFERENCE, "infer", root, data)
    net = workflow.parser.get_parsed_content("network_def")
    torch.save(net.state_dict(), ckpt_dir / "diffusion_model.pt")
    (ckpt_dir / "diffusion_model.json").write_text(json.dumps(
        {"scale_factor": 1.5, "latent_shape": [4, 4, 4, 4], "latent_min": -3.0, "latent_max": 3.0, "objective": "rflow",
         "prediction_type": "v_prediction", "num_train_timesteps": workflow.parser["num_train_timesteps"]}))
    workflow.initialize()
    return workflow


@pytest.mark.parametrize("max_epochs, num_volumes, match", [(0, 2, "max_epochs must be >= 1"),
                                                             (2, 0, "at least one batch")])
def test_max_epochs_errors_name_the_problem(tmp_path, max_epochs, num_volumes, match):
    loader = torch.utils.data.DataLoader([{"image": torch.zeros(1, 16, 16, 16)}] * num_volumes, batch_size=1)
    with pytest.raises(ValueError, match=match):
        VQGANTrainer(tiny_autoencoder(), torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), loader,
                     TrainerSettings(ckpt_dir=tmp_path), max_epochs=max_epochs)


@pytest.mark.parametrize("bundle", GENERATION, ids=lambda p: p.name)
def test_inference_config_has_network_def_and_inferer(bundle, datasets, tmp_path):
    """MONAI's InferProperties network_def and inferer (plus device, bundle_root, dataset_dir) are what sampling uses."""
    workflow = _inference_workflow(bundle, tmp_path, datasets[bundle.name])
    for name in ("bundle_root", "device", "dataset_dir", "network_def", "inferer"):
        assert getattr(workflow, name) is not None, name
    sampler = workflow.parser.get_parsed_content("sampler")
    assert workflow.network_def is workflow.parser.get_parsed_content("diffusion_model")
    assert sampler.diffusion_model is workflow.network_def
    assert type(workflow.network_def).__name__ == "Pseudo3DUNet"
    assert workflow.inferer.scale_factor == 1.5


@pytest.mark.parametrize("bundle", GENERATION, ids=lambda p: p.name)
def test_inference_config_has_all_monai_infer_properties(bundle, datasets, tmp_path):
    workflow = _inference_workflow(bundle, tmp_path, datasets[bundle.name])
    assert workflow.check_properties() == []


# -- every bundle: JSON formatting ------------------------------------------------------------------------

def test_pretty_json_is_the_pre_commit_hooks_output():
    hook = pytest.importorskip("pre_commit_hooks.pretty_format_json")
    texts = ['{"b": [1, 2], "a": {"z": null, "y": "Ny\u00fal \u00d7 2"}, "c": 1.50}',
             '{\n  "x": "$@a + \'/b\'",\n  "l": [],\n  "d": {}\n}\n', '[{"k": true}, 3e-4, "\\"q\\""]']
    for text in texts:
        assert pretty_json(text) == hook._get_pretty_format(text, indent=4, sort_keys=False)
        assert pretty_json(pretty_json(text)) == pretty_json(text)


def test_format_json_rewrites_only_unformatted_files_and_check_changes_nothing(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(pretty_json('{"a": [1, 2]}'))
    bad = tmp_path / "sub" / "bad.json"
    bad.parent.mkdir()
    bad.write_text('{"a": [1, 2], "b": {"c": "\u00fa"}}')
    hidden = tmp_path / ".cache" / "x.json"
    hidden.parent.mkdir()
    hidden.write_text("{not json")
    assert format_json_files([tmp_path], check=True) == [bad.resolve()]
    assert bad.read_text() == '{"a": [1, 2], "b": {"c": "\u00fa"}}'
    assert format_json_files([tmp_path]) == [bad.resolve()]
    assert bad.read_text() == '{\n    "a": [\n        1,\n        2\n    ],\n    "b": {\n        "c": "\\u00fa"\n    }\n}\n'
    assert format_json_files([tmp_path], check=True) == []
    main(["format-json", "--check", str(tmp_path)])  # formatted: returns (either order of the flag)
    main(["format-json", str(tmp_path), "--check"])
    bad.write_text('{"a": 1}')
    for argv in (["format-json", "--check", str(tmp_path)], ["format-json", str(tmp_path), "--check"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 1 and bad.read_text() == '{"a": 1}'
    broken = tmp_path / "broken.json"
    broken.write_text('{"a": 1,}')
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
        format_json_files([tmp_path], check=True)


JSON_FILES = find_json_files([REPO / "bundles", REPO / "common" / "configs"])


def test_json_files_are_found():
    names = {p.relative_to(REPO).as_posix() for p in JSON_FILES}
    assert {"common/configs/generative/common.json", "bundles/mri_generative_diffusion/configs/metadata.json",
            "bundles/breast_mri_segmentation/configs/inference.json"} <= names


@pytest.mark.parametrize("path", JSON_FILES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_json_is_formatted_as_the_zoo_pre_commit_hook_wants(path):
    text = path.read_text(encoding="utf-8")
    assert text == pretty_json(text), f"{path} is not formatted: run `make format-json`"


# -- every bundle: README commands resolve ------------------------------------------------------------------

READMES = [REPO / "README.md"] + [b / "docs" / "README.md" for b in ALL_BUNDLES]
MAKE_TARGETS = set(re.findall(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)\s*:(?!=)", (REPO / "Makefile").read_text(), re.M))
MONAI_FILE_ARGS = {"config_file", "meta_file", "logging_file", "args_file"}
MONAI_OUTPUT_ARGS = {"filepath", "ckpt_file", "key_in_ckpt", "use_trace", "input_shape", "device", "net_id", "p", "n",
                     "any", "extra_forward_args", "converter_kwargs"}


def _shell_commands(readme: Path) -> list[tuple[list[str], Path, str, bool]]:
    """(argv, cwd, source line, in a shell block) for every command in the fenced shell blocks and inline code spans.

    Understands what the docs use: ``\\`` continuations, comments, ``NAME=value`` variables (``$NAME``),
    ``(cd dir && cmd)``, ``cd dir`` and ``ENV=1 cmd`` prefixes.
    """
    home = REPO if readme.parent == REPO else readme.parent.parent
    text = readme.read_text()
    blocks = re.findall(r"^```(?:bash|sh|shell|console)\s*\n(.*?)^```", text, re.M | re.S)
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    spans = [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose)]
    commands = []
    for lines, in_block in [(b.replace("\\\n", " ").splitlines(), True) for b in blocks] + [(spans, False)]:
        cwd, variables = home, {}
        for line in lines:
            for name, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):  # $CONFIG before $C
                line = line.replace(f"${{{name}}}", value).replace(f"${name}", value)
            try:
                words = shlex.split(line, comments=True)
            except ValueError:  # an inline span that is not a command
                continue
            if not words:
                continue
            if len(words) == 1 and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]) and in_block:
                name, value = words[0].split("=", 1)
                variables[name] = value
                continue
            subshell = words[0].startswith("(")
            words = [w.strip("()") if i in (0, len(words) - 1) else w for i, w in enumerate(words)]
            here = cwd
            for part in _split_and(words):
                while part and re.fullmatch(r"[A-Za-z_]\w*=.*", part[0]):
                    part = part[1:]
                if part[:1] == ["cd"] and len(part) == 2:
                    here = (here / part[1]).resolve()
                elif part:
                    commands.append((part, here, line.strip(), in_block))
            if not subshell and in_block:
                cwd = here
    return commands


def _split_and(words: list[str]) -> list[list[str]]:
    parts: list[list[str]] = [[]]
    for w in words:
        if w in ("&&", ";"):
            parts.append([])
        elif w:
            parts[-1].append(w)
    return [p for p in parts if p]


def _options(argv: list[str]) -> dict[str, str | None]:
    """``--key value`` / ``--key=value`` / ``--flag`` pairs of an argv tail."""
    found: dict[str, str | None] = {}
    i = 0
    while i < len(argv):
        word = argv[i]
        if word.startswith("--"):
            key, eq, value = word[2:].partition("=")
            if eq:
                found[key] = value
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                found[key] = argv[i + 1]
                i += 1
            else:
                found[key] = None
        i += 1
    return found


def _check_monai_bundle(sub: str, args: list[str], cwd: Path, where: str) -> None:
    options = _options(args)
    if "config_file" not in options:
        assert sub == "run" and not args, f"{where}: `monai.bundle {sub}` without --config_file"
        return
    value = options["config_file"]
    config_files = ast.literal_eval(value) if value.startswith("[") else [value]
    for f in config_files:
        assert (cwd / f).is_file(), f"{where}: config file {cwd / f} does not exist"
    if options.get("meta_file"):
        assert (cwd / options["meta_file"]).is_file(), f"{where}: {options['meta_file']} does not exist"
    parser = ConfigParser()
    parser.read_config([str(cwd / f) for f in config_files])
    parser.parse()
    for key in options:
        if key not in MONAI_FILE_ARGS | MONAI_OUTPUT_ARGS:
            assert key in parser, f"{where}: --{key} overrides no id of the merged config"
    for ref in ReferenceResolver.find_refs_in_config(parser.get(), id=""):
        assert ref in parser, f"{where}: the merged config references a missing id @{ref}"
    if sub == "run":
        assert "run" in parser, f"{where}: the merged config has no `run`"
    else:  # ckpt_export / verify_net_in_out / trt_export: the network id comes first
        net_id = args[0] if args and not args[0].startswith("--") else options.get("net_id", "network_def")
        assert net_id in parser, f"{where}: {net_id} is not an id of the merged config"


def _check_meddiff(args: list[str], where: str, strict: bool) -> None:
    """``meddiff`` subcommand, group subcommand and options; a prose mention (not ``strict``) may stop early."""
    if not args and not strict:
        return
    assert args and args[0] in COMMANDS, f"{where}: `meddiff {args[:1]}` is not a command ({sorted(COMMANDS)})"
    command, rest = COMMANDS[args[0]], args[1:]
    if isinstance(command, dict):
        if not rest and not strict:
            return
        assert rest and rest[0] in command, f"{where}: `meddiff {args[0]} {rest[:1]}` is not a subcommand"
        command, rest = command[rest[0]], rest[1:]
    params = inspect.signature(command).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for key, value in _options(rest).items():
        name = key.replace("-", "_")
        if value is None and name not in params and name.startswith("no"):
            name = name[2:]
        assert name in params, f"{where}: `meddiff {args[0]}` has no option --{key}"


def _is_checked(argv: list[str]) -> bool:
    """``make``, ``meddiff`` and ``python -m`` / ``torchrun -m`` commands (not pip, ls, ...)."""
    python = re.fullmatch(r"(.*/)?python[0-9.]*|torchrun", argv[0]) is not None
    return len(argv) > 1 and (argv[0] in ("make", "meddiff") or (python and "-m" in argv[:-1]))


def _check_command(argv: list[str], cwd: Path, where: str, strict: bool) -> None:
    if argv[0] == "make":
        targets = [w for w in argv[1:] if not w.startswith("-") and "=" not in w]
        for t in targets:
            assert t in MAKE_TARGETS, f"{where}: make target {t!r} does not exist"
    elif argv[0] == "meddiff":
        _check_meddiff(argv[1:], where, strict)
    else:
        module, rest = argv[argv.index("-m") + 1], argv[argv.index("-m") + 2:]
        assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
        if module == "meddiff.cli.main":
            _check_meddiff(rest, where, strict)
        elif module == "monai.bundle" and rest:
            _check_monai_bundle(rest[0], rest[1:], cwd, where)


COMMANDS_IN_DOCS = [(readme, *command) for readme in READMES for command in _shell_commands(readme)
                    if _is_checked(command[0])]


def test_readmes_hold_the_commands_this_test_checks():
    kinds = {(r.relative_to(REPO).as_posix(), Path(a[0]).name) for r, a, *_ in COMMANDS_IN_DOCS}
    for readme in READMES:
        name = readme.relative_to(REPO).as_posix()
        assert (name, "python") in kinds or (name, "torchrun") in kinds, f"{name}: no bundle command found"
    assert ("README.md", "make") in kinds


@pytest.mark.parametrize("readme, argv, cwd, line, in_block", COMMANDS_IN_DOCS,
                         ids=[f"{r.relative_to(REPO).as_posix()}:{' '.join(a[:4])[:60]}" for r, a, *_ in COMMANDS_IN_DOCS])
def test_readme_command_resolves(readme, argv, cwd, line, in_block):
    _check_command(argv, cwd, f"{readme.relative_to(REPO)}: {line[:200]}", strict=in_block)


# -- every bundle: shipped weights ------------------------------------------------------------------------

@pytest.mark.parametrize("bundle", ALL_BUNDLES, ids=lambda p: p.name)
def test_weights_manifest_lists_the_shipped_weights_with_their_hashes(bundle):
    """Committed, so listed in ``weights.sha256``, not as url-less ``large_files.yml`` entries (tests/bundles/
    test_zoo_export.py: the zoo submission written by ``meddiff export --zoo`` and its downloads)."""
    from meddiff.cli.export import read_weights_manifest

    entries = read_weights_manifest(bundle, check=True)
    assert not list(bundle.glob("large_files.*")), f"{bundle.name}: the zoo's CI would download url-less entries"
    assert sum((bundle / p).stat().st_size for p in entries) < 20 * 2**20, "shipped weights over 20 MB"
