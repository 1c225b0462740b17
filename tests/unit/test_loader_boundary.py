"""The loader boundary (issue 25, item 3): the Loader protocol, one registry of loader kinds that the recipe,
the harness, the errors and the docs read, typed settings with unknown options refused, no default kept
below build_loader, and one epoch/size/resume mechanism for every loader. Real batches: tests/component."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from pipelines import KINDS, REGISTRY, Loader, LoaderSettings, build_loader
from pipelines.errors import UserError
from pipelines.loader import DaliCheckpoint, EpochLoader, EpochPosition
from pipelines.registry import choices_help, kinds, markdown_table

DOCS = Path(__file__).resolve().parents[2] / "docs"


def synthetic(split="train", **kw):
    return build_loader("synthetic", split, None, batch_size=2, image_size=8, num_samples=8, num_classes=3, **kw)


def test_an_unknown_option_is_refused_naming_it_and_the_accepted_ones(tmp_path):
    with pytest.raises(UserError) as error:  # before any data is touched: the folder does not exist
        build_loader("dali-cpu", "val", tmp_path / "missing", batch_size=2, image_size=32, no_such_option=1)
    message = str(error.value)
    assert "no_such_option" in message and "settings (a LoaderSettings)" in message and "dali_threads" in message
    assert "\n" not in message
    with pytest.raises(UserError, match="threads"):  # a near miss is no better than a typo
        synthetic(threads=2)


def test_settings_come_typed_or_one_field_at_a_time_and_are_validated():
    assert synthetic(settings=LoaderSettings(workers=0)).num_classes == 3
    assert synthetic(workers=0, prefetch=3).num_classes == 3
    with pytest.raises(UserError, match="prefetch must be at least 1"):
        synthetic(prefetch=0)
    with pytest.raises(UserError, match="hw_decoder_load must lie in"):
        synthetic(settings=LoaderSettings(hw_decoder_load=1.5))


def test_every_loader_is_a_loader_and_shares_one_epoch_and_resume_mechanism():
    from pipelines.torchvision_loader import TorchvisionLoader
    from pipelines.dali import DaliLoader
    from pipelines.dali_shards import ShardDaliLoader
    from pipelines.synthetic import SyntheticLoader
    from pipelines.torchvision_gpu import TorchvisionGpuLoader

    for cls in (TorchvisionLoader, TorchvisionGpuLoader, SyntheticLoader):
        assert issubclass(cls, EpochPosition)
    for cls in (DaliLoader, ShardDaliLoader):
        assert issubclass(cls, DaliCheckpoint)
    for cls in (TorchvisionLoader, TorchvisionGpuLoader, SyntheticLoader, DaliLoader, ShardDaliLoader):
        assert "set_epoch" not in vars(cls), f"{cls.__name__} decides the epoch's size itself (EpochLoader does)"
        assert issubclass(cls, EpochLoader)
    loader = synthetic()
    assert isinstance(loader, Loader)
    for name in ("num_samples", "num_classes", "class_counts", "image_size", "decode"):
        assert hasattr(loader, name), name


def test_progressive_resizing_and_resume_in_the_one_place():
    from pipelines.augmentation import Augmentation

    aug = Augmentation(min_res=16, max_res=32, start_ramp=1, end_ramp=2)
    loader = synthetic(augmentation=aug)
    assert loader.image_size == 16 and {x.shape[-1] for x, _ in loader} == {16}  # a whole epoch
    loader.set_epoch(2)
    assert loader.image_size == 32 and next(iter(loader))[0].shape[-1] == 32
    state = loader.state_dict()
    assert state == {"epoch": 2, "position": 1}
    resumed = synthetic(augmentation=aug)
    resumed.load_state_dict(state)
    assert resumed.image_size == 32 and len(list(resumed)) == len(resumed) - 1  # the rest of the epoch
    assert synthetic("val", augmentation=aug).image_size == 8  # validation: image_size, never ramped


def test_the_loader_constructors_keep_no_default_of_their_own():
    """Every setting reaches a loader from LoaderSettings (pipelines/settings.py), the one home of the defaults."""
    from pipelines.torchvision_loader import TorchvisionLoader
    from pipelines.dali import DaliLoader, training_pipeline, validation_pipeline
    from pipelines.dali_shards import ShardDaliLoader
    from pipelines.synthetic import SyntheticLoader
    from pipelines.torchvision_gpu import TorchvisionGpuLoader

    for function in (TorchvisionLoader, TorchvisionGpuLoader, SyntheticLoader, DaliLoader, ShardDaliLoader,
                     training_pipeline, validation_pipeline):
        defaults = [p.name for p in inspect.signature(function).parameters.values()
                    if p.default is not inspect.Parameter.empty]
        assert not defaults, f"{function.__qualname__} has defaults of its own: {defaults}"
    import pipelines

    assert not hasattr(pipelines, "default_workers") and not hasattr(pipelines, "AUTO_WORKERS")


def test_the_registry_is_what_the_recipe_the_harness_and_the_errors_read():
    from benchmarks.plan import LOADERS, default_loaders
    from rn50.config.machine import Machine

    assert KINDS == tuple(REGISTRY)
    assert choices_help() in Machine.__dataclass_fields__["loader"].metadata["help"]  # --loader's help
    assert LOADERS == tuple(k for k in KINDS if REGISTRY[k].reads_images)
    assert default_loaders(False) == tuple(k for k in LOADERS if not REGISTRY[k].needs_cuda
                                           and not REGISTRY[k].not_a_cpu_default)
    assert set(kinds(dali=True)) == {"dali", "dali-hybrid", "dali-cpu"}
    for name, record in REGISTRY.items():
        assert record.name == name and record.description
        assert "\n" not in record.description
    if not torch.cuda.is_available():
        for name in (k for k in KINDS if REGISTRY[k].needs_cuda):
            with pytest.raises(UserError, match=f"the {name} loader {REGISTRY[name].needs_cuda} but CUDA"):
                build_loader(name, "train", None, batch_size=2, image_size=8)
    with pytest.raises(UserError, match="use --loader dali, dali-hybrid or dali-cpu with them"):
        build_loader("torchvision", "train", None, batch_size=2, image_size=8, randaugment_magnitude=9)


def test_every_record_names_its_loader_classes_by_path_and_the_registry_imports_none():
    """The registry imports no loader module (the loaders may import it): each record names its classes as
    "module:Class", imported when built; each class is an EpochLoader that builds itself from a Request."""
    import ast

    import pipelines.registry

    tree = ast.parse(Path(pipelines.registry.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | \
        {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {name for name in imported if name and name.startswith("pipelines")} - \
        {"pipelines.augmentation", "pipelines.loader", "pipelines.settings"}  # those three for type hints only
    for record in REGISTRY.values():
        for shards in (False, True) if record.reads_shards else (False,):
            cls = record.loader_class(shards)
            assert issubclass(cls, EpochLoader) and callable(cls.from_request), (record.name, shards)
        # elastic: driven by the one global order (EpochPosition's segments), never a DALI checkpoint
        assert record.elastic == issubclass(record.loader_class(), EpochPosition), record.name
    assert kinds(elastic=True) == ("torchvision-gpu", "torchvision", "synthetic")
    from pipelines.registry import LoaderKind

    folders_only = LoaderKind("x", "x", "pipelines.torchvision_loader:TorchvisionLoader", reads_shards=False, advice_gpu=("a",),
                              advice_cpu=("a",))
    with pytest.raises(ValueError, match="reads no shards"):
        folders_only.loader_class(shards=True)


def test_auto_is_the_registry_kind_for_the_device():
    from pipelines.registry import AUTO, concrete_kind

    assert concrete_kind(AUTO, "cuda") == "dali" and concrete_kind(AUTO, "cpu") == "dali-cpu"
    assert concrete_kind(AUTO, "mps") == "dali-cpu"  # any device but CUDA
    assert [concrete_kind(kind, "cuda") for kind in KINDS] == list(KINDS)  # any other kind as it is
    assert [k for k in KINDS if REGISTRY[k].auto_on] == ["dali", "dali-cpu"]


def test_every_kind_that_reads_images_has_the_verdicts_advice_wherever_it_runs():
    """A new kind cannot silently get no advice: a record without it is refused when the registry is built."""
    from benchmarks.verdict import next_steps
    from pipelines.registry import LoaderKind

    for name, record in REGISTRY.items():
        assert bool(next_steps(name, "cuda")) == record.reads_images, name
        assert bool(next_steps(name, "cpu")) == (record.reads_images and not record.needs_cuda), name
        assert not any("--loader dali " in step or "--loader dali)" in step for step in next_steps(name, "cpu"))
    with pytest.raises(ValueError, match="advice_gpu"):
        LoaderKind("new", "a new kind", "pipelines.torchvision_loader:TorchvisionLoader")
    with pytest.raises(ValueError, match="advice_cpu"):
        LoaderKind("new", "a new kind", "pipelines.torchvision_loader:TorchvisionLoader", advice_gpu=("switch",))
    LoaderKind("new", "a new kind", "pipelines.torchvision_loader:TorchvisionLoader", advice_gpu=("a",), needs_cuda="decodes")


def test_the_pre_flight_reads_which_loaders_decode_by_content_from_the_registry():
    from pipelines.folder import _stopping

    problems = [("a.JPEG", "CMYK JPEG (4 colour components)"), ("b.JPEG", "zero bytes")]
    for name, record in REGISTRY.items():
        if record.reads_images:
            assert len(_stopping(problems, record.decodes_by_content)) == (1 if record.decodes_by_content else 2), name


def test_docs_loaders_table_is_the_registry():
    page = (DOCS / "loaders.md").read_text()
    assert markdown_table() in page, "docs/loaders.md's table is stale; paste pipelines.registry.markdown_table()"
