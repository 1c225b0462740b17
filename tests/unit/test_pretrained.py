"""Pretrained weights by name (issue 40, 5): `--pretrained` is a bare flag for `--weights DEFAULT`, a name is
torchvision's enum member of the arch, its file the one in the torch hub cache; a missing file without a network
is one line naming the file, where to put it and its URL."""

from __future__ import annotations

import argparse

import pytest

from rn50.config.cli import add_recipe_flags, parse_strict
from rn50.config.errors import NodeWideError, UserError
from rn50.config.recipe import resolve
from rn50.core import pretrained

CLOSED_PROXY = "http://127.0.0.1:9"  # the discard port, closed: a connection is refused at once, as offline


def parse(argv):
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_recipe_flags(parser)
    return resolve(parse_strict(parser, argv)).recipe


def test_pretrained_is_a_bare_flag_for_the_default_weights():
    """timm's habit: `--pretrained` takes no value (it was a pointer to --finetune-from before)."""
    assert parse(["--pretrained"]).model.weights == "DEFAULT"
    assert parse(["--weights", "IMAGENET1K_V1"]).model.weights == "IMAGENET1K_V1"
    assert parse([]).model.weights == ""


@pytest.mark.parametrize("argv, words", [
    (["--weights", "IMAGENET1K_V1", "--pretrained"], "not allowed with argument --weights"),
    (["--pretrained", "--finetune-from", "w.pth"], "--finetune-from both name the starting weights"),
    (["--weights", "IMAGENET1K_V2", "--finetune-from", "w.pth"], "--finetune-from both name the starting weights"),
])
def test_two_sources_of_starting_weights_are_one_line(argv, words):
    with pytest.raises(UserError) as error:
        parse(argv)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_a_name_resolves_to_the_enum_and_its_file_in_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    default = pretrained.named("resnet50", "DEFAULT")
    assert (default.name, default.enum) == ("IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V2")
    assert default.url == "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"
    assert default.path == tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    assert default.hash_prefix == "11ad3fa6"
    assert pretrained.named("resnet50", "ResNet50_Weights.IMAGENET1K_V1").name == "IMAGENET1K_V1"
    assert pretrained.named("resnet18", "imagenet1k_v1").enum == "ResNet18_Weights.IMAGENET1K_V1"


@pytest.mark.parametrize("arch, given", [("resnet18", "NOPE"), ("resnet18", "IMAGENET1K_V2"),
                                         ("resnet50", "ResNet18_Weights.IMAGENET1K_V1")])
def test_a_name_the_arch_lacks_is_one_line_listing_its_names(arch, given):
    with pytest.raises(NodeWideError) as error:
        pretrained.named(arch, given)
    message = str(error.value)
    names = "IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT" if arch == "resnet50" else "IMAGENET1K_V1, DEFAULT"
    assert "\n" not in message and f"--weights {given} is not a name of {arch}'s weights" in message
    assert f"one of {names} " in message and "--finetune-from FILE" in message


def test_a_missing_file_without_a_network_is_one_line_naming_the_file_and_the_url(tmp_path, monkeypatch):
    """The acceptance check's case, without a process: an empty TORCH_HOME and no network (a proxy on a closed
    port, so that a machine with a network behaves as one without). Nothing is written into the cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub-home"))
    for variable in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(variable, CLOSED_PROXY)
    weights = pretrained.named("resnet50", "DEFAULT")
    assert not pretrained.online(weights.url)
    with pytest.raises(NodeWideError) as error:
        pretrained.ensure_file(weights, fetch=True, wait=lambda: None, progress=False)
    message = str(error.value)
    assert "\n" not in message and message.startswith("resnet50's IMAGENET1K_V2 weights (DEFAULT) are not on this")
    assert f"put it at {tmp_path / 'hub-home' / 'hub' / 'checkpoints' / 'resnet50-11ad3fa6.pth'} " in message
    assert "fetch https://download.pytorch.org/models/resnet50-11ad3fa6.pth " in message
    assert not (tmp_path / "hub-home").exists()


def test_a_file_in_the_cache_is_used_as_it_is(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = pretrained.named("resnet18", "DEFAULT")
    weights.path.parent.mkdir(parents=True)
    weights.path.write_bytes(b"weights")
    waited = []
    # fetch=True: were the file not found, a download would be tried (and the closed proxy would refuse it)
    monkeypatch.setenv("https_proxy", CLOSED_PROXY)
    assert pretrained.ensure_file(weights, fetch=True, wait=lambda: waited.append(1), progress=False) == weights.path
    assert waited == [1]  # every process waits for its node's fetch, found or not
