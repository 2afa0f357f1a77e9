"""FSDP2 (``fsdp_version: 2``) with tied LoRA modules.

torch's rule for a module reached from several parents (``torch.distributed.fsdp.fully_shard``): it must be its
own FSDP group, sharded *before* its parents, because ``fully_shard(parent)`` takes every parameter below it that
no earlier call claimed. Then each parent skips it, its forward pre-hook all-gathers it at every call (once per
member layer per forward) and its post-backward hook reduce-scatters each call's gradient into the one sharded
gradient, so the shared gradient is the sum over the member layers, averaged over ranks as under DDP.

What Axolotl 0.19 does instead (``axolotl/monkeypatch/accelerate/fsdp2.py::fsdp2_prepare_model``, installed over
accelerate's ``fsdp2_prepare_model`` whenever ``fsdp_version: 2``): it walks the model bottom-up with
accelerate's ``get_module_children_bottom_up`` — which lists a module once *per parent* — and calls
``fully_shard`` on ``lora_A[adapter]`` and ``lora_B[adapter]`` of every PEFT ``LoraLayer``
(``_process_lora_module_for_fsdp``), then on each decoder layer (auto-wrap policy), then on the root. The leader's
visit gives a tied module its own group, in the right order; the first member's visit calls ``fully_shard`` on it
again and torch refuses: "Each distinct composable distributed API can only be applied to a module once".
accelerate's own ``fsdp2_prepare_model`` (no per-LoRA groups) lets the leader's decoder layer take the shared
parameters into its group; the member's layer then meets them as DTensors, takes them for tensor-parallel shards and
fails in torch's ``_init_sharding_spec_tp`` ("Invariant encountered: value was None when it should not be").

What :func:`shard_shared_modules_once` does: it wraps whatever ``accelerate.accelerator.fsdp2_prepare_model`` is
when training starts, and for the duration of that call replaces ``torch.distributed.fsdp.fully_shard`` (both
Axolotl and accelerate import it inside the function) with a guard that

- before sharding a module that contains a tied LoRA module not yet sharded, shards the tied module first, with
  the keyword arguments of that very call (the same mesh, ``MixedPrecisionPolicy``, ``reshard_after_forward``
  and offload policy every other LoRA group gets), and
- makes a repeated ``fully_shard`` on an already sharded tied module a no-op.

So each tied module is sharded exactly once, as its own group; every other step stays Axolotl's own code (its
bias-dtype fix, DoRA magnitudes, which stay per layer, activation checkpointing, fp32 norms, RAM-efficient
loading). Before sharding, rank 0's trainable values are copied to every rank (:func:`broadcast_trainable_from_rank0`:
FSDP2 does not synchronise module states as DDP does, and Axolotl creates LoRA weights unseeded). Why not a plugin
hook: the FSDP keyword arguments (mesh, mixed precision) only exist inside the prepare
call, and pre-sharding from ``post_lora_load``/``post_trainer_create`` would still meet Axolotl's second
``fully_shard`` on the same module. Why not replace ``_process_lora_module_for_fsdp``: it would copy Axolotl's
per-LoRA logic and drift from it.

Saving: Axolotl 0.19 writes the final adapter of an FSDP2 LoRA run with
``axolotl.integrations.expert_parallel.shard.save_fsdp2_lora_adapter``, which gathers ``model.named_parameters()``
— deduplicated, so a tied tensor appears under its leader's name only and the member layers' keys are missing from
``adapter_model.safetensors`` (plain PEFT would load those layers with fresh LoRA weights, i.e. ``lora_B = 0``).
:func:`complete_saved_adapter` fills them in after that save, as PEFT's own ``save_pretrained`` does for aliased
tensors: one equal copy per member layer. Checkpoints: ``SHARDED_STATE_DICT`` ones (torch.distributed.checkpoint)
resume exactly, re-tied from the checkpoint's plan by the plugin's ``pre_lora_load``/``post_lora_load`` before
the Trainer loads them. ``FULL_STATE_DICT`` ones do not, for any PEFT model under FSDP2 in accelerate 1.13: its
adapter-only ``pytorch_model_fsdp.bin`` holds rank 0's shards and is loaded on rank 0 only (:func:`prepare_fsdp2`
warns).

CPU: accelerate 1.13 chooses ``DistributedType.FSDP`` only for accelerator backends (``MULTI_GPU`` …); a CPU-only
multi-process launch stays ``MULTI_CPU`` and the Trainer wraps the model in DDP while the config says FSDP.
Axolotl 0.19 builds its FSDP device mesh for ``"cuda"`` unconditionally. ``fully_shard`` itself runs on CPU over
gloo, so :func:`use_fsdp2_on_cpu` points both at the CPU there (the tests and ``recipes/smollm2_sharelora_fsdp2.yml``
run FSDP2 on two CPU processes).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sharelora_plugin.args import config_value, fsdp_version
from sharelora_plugin.distributed import LOG, cpu_only_multiprocess
from sharelora_plugin.tying import SHARED_ATTRS

ADAPTER_FILENAME = "adapter_model.safetensors"


def tied_lora_modules(model) -> list:
    """The ``lora_A``/``lora_B`` modules that more than one PEFT ``LoraLayer`` holds (the tied ones), in the
    order of the model's modules."""
    from peft.tuners.lora import LoraLayer

    holders: dict[int, int] = {}
    modules: dict[int, Any] = {}
    for layer in model.modules():
        if not isinstance(layer, LoraLayer):
            continue
        for attr in SHARED_ATTRS:
            for sub in getattr(layer, attr).values():
                holders[id(sub)] = holders.get(id(sub), 0) + 1
                modules.setdefault(id(sub), sub)
    return [modules[key] for key, count in holders.items() if count > 1]


@contextlib.contextmanager
def _fully_shard_once(tied: Sequence, extra_namespaces: Sequence[Any] = ()) -> Iterator[dict]:
    """Within the block, ``fully_shard`` shards each module of ``tied`` once, before any module containing it,
    and skips repeated calls on it. Yields a counter of the skipped calls for the log."""
    import torch.distributed.fsdp as torch_fsdp
    from torch.distributed.fsdp import FSDPModule

    original = torch_fsdp.fully_shard
    tied_ids = {id(m) for m in tied}
    counts = {"skipped": 0}

    @functools.wraps(original)
    def fully_shard(module, *args, **kwargs):
        targets = list(module) if isinstance(module, list | tuple) else [module]
        if all(id(m) in tied_ids and isinstance(m, FSDPModule) for m in targets):
            counts["skipped"] += 1  # a member layer reaching its leader's module again
            return module
        target_ids = {id(m) for m in targets}
        for parent in targets:
            for sub in parent.modules():
                if id(sub) in tied_ids and id(sub) not in target_ids and not isinstance(sub, FSDPModule):
                    original(sub, *args, **kwargs)  # same mesh, mixed precision, reshard and offload policy
        return original(module, *args, **kwargs)

    namespaces = [
        torch_fsdp,
        *[ns for ns in extra_namespaces if getattr(ns, "fully_shard", None) is original],
    ]
    for ns in namespaces:
        ns.fully_shard = fully_shard
    try:
        yield counts
    finally:
        for ns in namespaces:
            ns.fully_shard = original


def shard_shared_modules_once() -> None:
    """Wrap ``accelerate.accelerator.fsdp2_prepare_model`` (Axolotl's, once Axolotl patched it) so the tied LoRA
    modules become their own FSDP2 groups exactly once (see the module docstring). Idempotent."""
    import accelerate.accelerator

    prepare = accelerate.accelerator.fsdp2_prepare_model
    if getattr(prepare, "_sharelora_wrapped", False):
        return

    @functools.wraps(prepare)
    def fsdp2_prepare_model(accelerator, model):
        tied = tied_lora_modules(model)
        broadcast_trainable_from_rank0(model)
        if not tied:
            return prepare(accelerator, model)
        with _fully_shard_once(tied, [inspect.getmodule(prepare)]) as counts:
            prepared = prepare(accelerator, model)
        LOG.info(
            "ShareLoRA FSDP2: %d tied LoRA modules sharded once each as their own groups "
            "(%d repeated fully_shard calls on them skipped)",
            len(tied),
            counts["skipped"],
        )
        unsharded = [m for m in tied if not _is_fsdp_module(m)]
        if unsharded:
            raise RuntimeError(
                f"ShareLoRA FSDP2: {len(unsharded)} tied LoRA modules were not sharded by {prepare.__module__}."
                "fsdp2_prepare_model; their gradients would not be synchronised"
            )
        return prepared

    fsdp2_prepare_model._sharelora_wrapped = True
    accelerate.accelerator.fsdp2_prepare_model = fsdp2_prepare_model


def broadcast_trainable_from_rank0(model) -> int:
    """Copy rank 0's trainable parameters to every rank (shared tensors once); returns how many were sent.

    ``fully_shard`` keeps each rank's own slice of whatever that rank holds, and unlike DDP it does not broadcast
    module states. Axolotl creates the LoRA modules without seeding, so every rank initialises its own random
    ``lora_A``; sharded as they are, the adapter would be a mix of rows from different ranks' draws. Sending rank
    0's values first gives what DDP gives: every rank trains rank 0's initialisation. Parameters still on the meta
    device (Axolotl's RAM-efficient loading, which broadcasts rank 0's weights itself) are left alone."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() < 2:
        return 0
    sent = 0
    for param in model.parameters():  # deduplicated: a tied tensor once
        if param.requires_grad and not param.is_meta:
            dist.broadcast(param.data, src=0)
            sent += 1
    return sent


def _is_fsdp_module(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def complete_saved_adapter(folder: str | Path, share_sets: Sequence[Sequence[int]], layers_path: str) -> int:
    """Give every member layer of each share set its own copy of the leader's tensors in
    ``folder/adapter_model.safetensors`` where the saver wrote the leader's only. Returns the number of tensors
    added. A member key that is present must equal the leader's (else ``ValueError``)."""
    import torch
    from safetensors.torch import load_file, save_file

    path = Path(folder) / ADAPTER_FILENAME
    tensors = load_file(str(path))
    prefix = layers_path.removesuffix(".") + "."
    added = 0
    for share_set in share_sets:
        leader, *members = sorted(int(i) for i in share_set)
        lead_prefix = f"{prefix}{leader}."
        lead_keys = [k for k in tensors if k.startswith(lead_prefix) and ".lora_" in k]
        if not lead_keys:
            raise ValueError(
                f"{path}: no LoRA tensors of layer {leader} under {prefix!r}; cannot complete share set "
                f"{sorted(share_set)}"
            )
        for member in members:
            for key in lead_keys:
                member_key = f"{prefix}{member}." + key[len(lead_prefix) :]
                if member_key in tensors:
                    if not torch.equal(tensors[member_key], tensors[key]):
                        raise ValueError(
                            f"{path}: {member_key} differs from {key} though the layers are tied"
                        )
                    continue
                tensors[member_key] = tensors[key].clone()
                added += 1
    if added:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return added


def complete_axolotl_fsdp2_adapter_save(share_sets: Sequence[Sequence[int]], layers_path: str) -> None:
    """Wrap Axolotl's ``save_fsdp2_lora_adapter`` (the final adapter save of an FSDP2 LoRA run) so the file it
    writes holds every member layer (see the module docstring). Idempotent."""
    try:
        from axolotl.integrations.expert_parallel import shard
    except ImportError:  # another Axolotl: nothing of ours to fix
        return
    save = getattr(shard, "save_fsdp2_lora_adapter", None)
    if save is None or getattr(save, "_sharelora_wrapped", False):
        return

    @functools.wraps(save)
    def save_fsdp2_lora_adapter(model, output_dir):
        import torch.distributed as dist

        handled = save(model, output_dir)
        if handled and (not dist.is_initialized() or dist.get_rank() == 0):
            added = complete_saved_adapter(output_dir, share_sets, layers_path)
            LOG.info(
                "ShareLoRA FSDP2: wrote %d member-layer copies into %s/%s",
                added,
                output_dir,
                ADAPTER_FILENAME,
            )
        if handled and dist.is_initialized():
            dist.barrier()
        return handled

    save_fsdp2_lora_adapter._sharelora_wrapped = True
    shard.save_fsdp2_lora_adapter = save_fsdp2_lora_adapter


def use_fsdp2_on_cpu(cfg: Any) -> None:
    """On a CPU-only multi-process launch with ``fsdp_version: 2``, let Axolotl and accelerate run FSDP2 over gloo:
    Axolotl 0.19 builds its data-parallel device mesh for ``"cuda"`` unconditionally
    (``axolotl.utils.distributed.build_parallelism_config``), and accelerate 1.13 keeps a CPU launch ``MULTI_CPU``
    (DDP) even with an FSDP plugin. No-op elsewhere; idempotent. Must run before the model loads (``register``)."""
    if fsdp_version(cfg) != 2 or not cpu_only_multiprocess():
        return
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    build_mesh = ParallelismConfig.build_device_mesh
    if not getattr(build_mesh, "_sharelora_wrapped", False):

        @functools.wraps(build_mesh)
        def build_device_mesh(self, device_type: str):
            return build_mesh(self, "cpu" if device_type == "cuda" else device_type)

        build_device_mesh._sharelora_wrapped = True
        ParallelismConfig.build_device_mesh = build_device_mesh

    init = AcceleratorState.__init__
    if not getattr(init, "_sharelora_wrapped", False):

        @functools.wraps(init)
        def __init__(self, *args, fsdp_plugin=None, **kwargs):
            init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
            if (
                fsdp_plugin is not None
                and getattr(fsdp_plugin, "fsdp_version", 1) == 2
                and self.distributed_type == DistributedType.MULTI_CPU
            ):
                self.distributed_type = DistributedType.FSDP
                self.fsdp_plugin = fsdp_plugin
                PartialState._shared_state["distributed_type"] = DistributedType.FSDP

        __init__._sharelora_wrapped = True
        AcceleratorState.__init__ = __init__


def prepare_fsdp2(cfg: Any, share_sets: Sequence[Sequence[int]], layers_path: str) -> bool:
    """Everything ShareLoRA needs under ``fsdp_version: 2``, installed after tying and before the Trainer
    prepares the model. Returns whether FSDP2 is on."""
    if fsdp_version(cfg) != 2:
        return False
    shard_shared_modules_once()
    complete_axolotl_fsdp2_adapter_save(share_sets, layers_path)
    state_dict_type = config_value(config_value(cfg, "fsdp_config"), "state_dict_type")
    if str(state_dict_type).upper() == "FULL_STATE_DICT":
        LOG.warning(
            "ShareLoRA FSDP2: fsdp_config.state_dict_type FULL_STATE_DICT writes checkpoints that do not resume "
            "correctly with a PEFT model under FSDP2 in accelerate 1.13 (its adapter-only FSDP2 checkpoint holds "
            "rank 0's shards only and is loaded on rank 0 only: on resume, the other ranks' slices of the LoRA "
            "weights restart from their initialisation; plain LoRA is affected alike). The final adapter is "
            "complete either way. Use SHARDED_STATE_DICT for checkpoints you will resume from."
        )
    return True
