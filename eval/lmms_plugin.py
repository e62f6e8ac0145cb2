"""lmms-eval model ``vtc_llava_hf``: a Hugging Face checkpoint of any supported type (LLaVA, LLaVA-NeXT,
LLaVA-OneVision, LLaVA-NeXT-Video, Qwen2-VL, Qwen2.5-VL, Qwen3-VL) with any vtc method applied; model arg
``threads=N`` sets torch's CPU threads (as ``OMP_NUM_THREADS=N``).

Registration
------------
lmms-eval 0.7 builds its model registry (``lmms_eval.models.MODEL_REGISTRY_V2``) from its built-in
table plus the Python entry points of group ``lmms_eval.models``; each entry point must load to a
``ModelManifest`` (or an iterable of them, or a callable returning one). vtc's ``pyproject.toml``
declares::

    [project.entry-points."lmms_eval.models"]
    vtc_llava_hf = "vtc.eval.lmms_plugin:MANIFEST"

so after ``pip install`` the model is available as ``--model vtc_llava_hf``. ``MANIFEST`` is a function
returning the manifest (a payload form lmms-eval accepts), so this module imports nothing from
``lmms_eval`` at import time: lmms-eval loads it while its own ``lmms_eval.models`` package is still
initialising, and vtc may import it before lmms-eval. The manifest names two classes, built lazily on
first access: :class:`VtcLlavaHfChat` (preferred by lmms-eval, receives chat messages) and
:class:`VtcLlavaHf` (``--force_simple``, receives prompt strings).

Use
---
::

    lmms-eval --model vtc_llava_hf \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,vtc_method=pdrop_default \\
        --tasks pope --batch_size 1 --output_path results/

``--model_args`` keys (besides lmms-eval's usual ``pretrained``, ``revision``, ``device``, ``dtype``,
``batch_size``, ``attn_implementation``, ``device_map``, ``chat_template``, ``use_cache``,
``trust_remote_code``):

* ``vtc_method``: a registered method name, a preset name from ``configs/`` or a preset YAML path;
  ``none`` (default) runs the unpatched model (no hooks at all);
* ``vtc_config``: a preset YAML path, or inline JSON: fields of ``vtc_method``
  (``vtc_config={"lam":0.4}``) or a whole spec (``{"method":"fastv","k":3}``);
* ``vtc_include_vision``: add the vision tower and projector to ``tflops_full`` (default false).

Batches (``--batch_size N``) are left-padded; requests are grouped by task and generation arguments.

Data parallel: launch lmms-eval under ``accelerate launch --num_processes N -m lmms_eval ...`` or
``torchrun --nproc_per_node N -m lmms_eval ...``. Each rank loads the model on the launcher's device
(``cuda:<LOCAL_RANK>`` on GPUs; the CPU with gloo under ``ACCELERATE_USE_CPU=true`` or without an
accelerator) and the ``vtc`` block is merged over all ranks' samples (see Results).

Results
-------
For every generated batch the plugin records the engine's per-layer token counts
(``handle.stats``; for the unpatched model the same record is built from the inputs) and the prefill
time (first forward of ``generate``, CUDA events on a GPU). After the last request, lmms-eval calls
``lm.clean()`` on every rank; there the records are gathered to all ranks (data parallel under
``accelerate launch``) and turned into the ``"vtc"`` block of :mod:`vtc.eval.results`.

lmms-eval 0.7.3 has no hook for a model to add keys to the results file: ``simple_evaluate`` builds
the results dict after the model is gone and the CLI hands it straight to
``EvaluationTracker.save_results_aggregated``. The plugin therefore wraps that method (once per
process, when the first model is built): if the results come from this plugin's model class
(``results["config"]["model_backend"]``) and have no ``"vtc"`` key, the pending block is added
before lmms-eval serialises the file. ``vtc eval`` (:mod:`vtc.eval.harness`) does not rely on the
wrapper: it takes the block from the model instance and writes it itself.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

MODEL_ID = "vtc_llava_hf"


def MANIFEST():  # noqa: N802 - the entry-point target named in pyproject.toml
    """The ``ModelManifest`` of ``vtc_llava_hf`` (lmms-eval calls entry-point payloads that are callables).

    A function rather than a module-level manifest so that importing this module never imports
    ``lmms_eval.models`` (whose ``__init__`` loads the entry points, i.e. this module: importing it first
    from vtc would otherwise be circular).
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id=MODEL_ID,
        simple_class_path=f"{__name__}.VtcLlavaHf",
        chat_class_path=f"{__name__}.VtcLlavaHfChat",
    )


_CLASSES: dict[str, type] = {}
_PENDING: dict[str, Any] = {}  # "block": the latest block computed in clean() on rank 0
_TRACKER_PATCHED = False

#: Fallback prompt when neither the processor nor the tokenizer has a chat template (LLaVA-1.5 style).
FALLBACK_TEMPLATE = "USER: {prompt} ASSISTANT:"
IMAGE_PLACEHOLDER = "<image>"


def __getattr__(name: str):
    if name in ("VtcLlavaHf", "VtcLlavaHfChat"):
        if not _CLASSES:
            _build_classes()
        return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def take_pending_block() -> dict | None:
    """The ``"vtc"`` block computed by the latest ``clean()`` on this rank (and forget it)."""
    return _PENDING.pop("block", None)


def _install_tracker_hook() -> None:
    """Wrap ``EvaluationTracker.save_results_aggregated`` to add the pending ``"vtc"`` block."""
    global _TRACKER_PATCHED
    if _TRACKER_PATCHED:
        return
    from lmms_eval.loggers.evaluation_tracker import EvaluationTracker

    original = EvaluationTracker.save_results_aggregated

    def save_results_aggregated(self, results, samples, datetime_str):
        backend = str((results or {}).get("config", {}).get("model_backend", ""))
        if isinstance(results, dict) and backend.startswith(__name__ + ".") and "vtc" not in results:
            block = take_pending_block()
            if block is not None:
                results["vtc"] = block
        return original(self, results, samples, datetime_str)

    save_results_aggregated.__wrapped__ = original  # type: ignore[attr-defined]
    EvaluationTracker.save_results_aggregated = save_results_aggregated
    _TRACKER_PATCHED = True


def parse_vtc_args(vtc_method: Any = None, vtc_config: Any = None) -> tuple[str | None, Any]:
    """``(method_name_for_labels, spec)`` from the ``vtc_method`` / ``vtc_config`` model args.

    ``spec`` is what :func:`vtc.apply` takes, or None for the unpatched model.
    """
    from vtc.eval.flops_cli import NO_METHOD, SpecError, method_spec

    method = None if vtc_method is None or str(vtc_method).strip() == "" else str(vtc_method)
    if vtc_config is None or (isinstance(vtc_config, str) and not vtc_config.strip()):
        return method, method_spec(method)
    if isinstance(vtc_config, str):
        text = vtc_config.strip()
        if text.startswith("{"):
            try:
                fields = json.loads(text)
            except json.JSONDecodeError as err:
                raise SpecError(f"vtc_config is not valid JSON ({err}): {text!r}") from err
        else:
            path = Path(text)
            if not path.is_file():
                raise SpecError(f"vtc_config: preset file not found: {text!r} (or pass inline JSON fields)")
            if method is not None and method.lower() not in NO_METHOD:
                raise SpecError(f"give either vtc_method={method!r} or a preset file in vtc_config, not both")
            return str(path), method_spec(str(path))
    elif isinstance(vtc_config, dict):
        fields = dict(vtc_config)
    else:
        raise SpecError(f"vtc_config must be a YAML path or a JSON object, got {type(vtc_config).__name__}")
    if not isinstance(fields, dict):
        raise SpecError(f"vtc_config JSON must be an object of method fields, got {type(fields).__name__}")
    if "method" in fields or "methods" in fields:
        if (
            method is not None
            and method.lower() not in NO_METHOD
            and fields.get("method") not in (None, method)
        ):
            raise SpecError(
                f"vtc_method={method!r} disagrees with vtc_config's method {fields.get('method')!r}"
            )
        import vtc

        try:
            vtc.resolve_methods(fields)
        except (ValueError, TypeError, FileNotFoundError) as err:
            raise SpecError(f"vtc_config: {err}") from err
        return (fields.get("method") or "+".join(str(m) for m in fields.get("methods", []))), fields
    return method, method_spec(method, fields)


def _launcher_device(accelerator, device: str | None):
    """The device of this data-parallel rank, as the launcher set it up.

    ``accelerator.device`` is ``cuda:<LOCAL_RANK>`` (or another accelerator) when the process group runs on
    one, and ``cpu`` under ``ACCELERATE_USE_CPU=true`` or on a machine without one. An explicit
    ``device=`` model arg must agree with it: one rank cannot run on another rank's device.
    """
    import torch

    dev = torch.device(accelerator.device)
    if device:
        want = torch.device(device)
        if want.type != dev.type:
            raise ValueError(
                f"{MODEL_ID}: device={device!r} but the data-parallel launcher put rank "
                f"{accelerator.process_index} on {dev}; drop device= (each rank takes its launcher's device) "
                "or run a single process"
            )
    return dev


def _build_classes() -> None:
    import torch
    from lmms_eval.api.instance import GenerationResult, TokenCounts
    from lmms_eval.api.model import lmms
    from tqdm import tqdm

    class VtcLlavaHf(lmms):
        """LLaVA (Hugging Face ``LlavaForConditionalGeneration``) with vtc hooks; simple (prompt-string) mode."""

        is_simple = True

        def __init__(
            self,
            pretrained: str = "llava-hf/llava-1.5-7b-hf",
            revision: str = "main",
            device: str | None = None,
            dtype: str | None = "auto",
            batch_size: int | str = 1,
            trust_remote_code: bool = False,
            attn_implementation: str | None = None,
            device_map: str = "",
            chat_template: str | None = None,
            use_cache: bool = True,
            vtc_method: str | None = None,
            vtc_config: Any = None,
            vtc_include_vision: bool = False,
            keep_model_after_eval: bool = False,
            threads: int | str | None = None,
            **kwargs,
        ) -> None:
            super().__init__()
            if kwargs:
                raise ValueError(
                    f"{MODEL_ID}: unknown model_args {sorted(kwargs)}; vtc options are vtc_method, vtc_config, "
                    "vtc_include_vision, threads (plus pretrained, revision, device, dtype, batch_size, "
                    "attn_implementation, device_map, chat_template, use_cache, trust_remote_code)"
                )
            if threads is not None and str(threads).strip() != "":
                # torch's CPU threads of this process (as OMP_NUM_THREADS=N would set them at start); on a
                # loaded machine fewer threads than cores run faster (`vtc eval --threads` does the same)
                from vtc.eval.threads import apply_threads

                try:
                    n = int(threads)
                except (TypeError, ValueError) as err:
                    raise ValueError(
                        f"{MODEL_ID}: threads must be a positive integer, got {threads!r}"
                    ) from err
                apply_threads(n)
            from accelerate import Accelerator
            from transformers import AutoProcessor

            import vtc
            from vtc.flops import ModelDims
            from vtc.loading import checkpoint_model_type, model_class

            self._label_method, spec = parse_vtc_args(vtc_method, vtc_config)
            try:
                self.batch_size_per_gpu = int(batch_size)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{MODEL_ID}: batch_size must be an integer, got {batch_size!r}") from err
            if self.batch_size_per_gpu < 1:
                raise ValueError(f"{MODEL_ID}: batch_size must be >= 1, got {batch_size!r}")

            # the model type picks the adapter and, through its `model_classes`, the class that loads it
            mt = checkpoint_model_type(pretrained)
            if mt is not None and mt not in vtc.supported_model_types():
                raise ValueError(
                    f"{MODEL_ID}: unsupported model {pretrained!r} (model_type={mt!r}); vtc supports "
                    f"{vtc.supported_model_types()}"
                )

            accelerator = Accelerator()
            distributed = accelerator.num_processes > 1 and device_map == ""
            if distributed:
                # The launcher's device: cuda:<LOCAL_RANK> under accelerate/torchrun on GPUs, the CPU when
                # there is no accelerator or ACCELERATE_USE_CPU is set (gloo backend).
                self._device = _launcher_device(accelerator, device)
                load_map = str(self._device)
            else:
                self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
                load_map = device_map or None
            if isinstance(dtype, str) and dtype != "auto":
                dtype = getattr(torch, dtype)
            load_kw: dict[str, Any] = dict(
                revision=revision, dtype=dtype, trust_remote_code=trust_remote_code
            )
            if load_map:
                load_kw["device_map"] = load_map
            if attn_implementation:
                load_kw["attn_implementation"] = attn_implementation
            if mt is None:
                from transformers import AutoConfig

                mt = AutoConfig.from_pretrained(
                    pretrained, revision=revision, trust_remote_code=trust_remote_code
                ).model_type
            model = model_class(mt).from_pretrained(pretrained, **load_kw).eval()
            self._processor = AutoProcessor.from_pretrained(
                pretrained, revision=revision, trust_remote_code=trust_remote_code
            )
            self._tokenizer = getattr(self._processor, "tokenizer", self._processor)
            # batched generation needs left padding (vtc requires it too)
            self._tokenizer.padding_side = "left"
            self.pretrained = str(pretrained)
            self.chat_template = chat_template
            self.use_cache = bool(use_cache)
            self.keep_model_after_eval = bool(keep_model_after_eval)
            self.include_vision = bool(vtc_include_vision)
            self.accelerator = accelerator
            if distributed:
                model = accelerator.prepare_model(model, evaluation_mode=True)
                self._rank = accelerator.process_index
                self._world_size = accelerator.num_processes
            else:
                if not load_map:
                    model = model.to(self._device)
                self._rank = 0
                self._world_size = 1
            self._model = model
            self._config = self.model.config
            self._dims = ModelDims.from_hf_config(self.model.config, name=Path(self.pretrained).name)
            self._handle = None
            self._spec = None
            self._records: list[tuple[str, dict, float | None, str]] = []
            self._merged: list[tuple[str, dict, float | None, str]] | None = None
            self.set_vtc_spec(self._label_method, spec)
            _install_tracker_hook()

        # ---- lmms-eval properties ---------------------------------------------------------------
        @property
        def model(self):
            acc = getattr(self, "accelerator", None)
            return acc.unwrap_model(self._model) if acc is not None else self._model

        @property
        def config(self):
            return self._config

        @property
        def tokenizer(self):
            return self._tokenizer

        @property
        def batch_size(self):
            return self.batch_size_per_gpu

        @property
        def device(self):
            return self._device

        @property
        def eot_token_id(self):
            return self._tokenizer.eos_token_id

        # ---- vtc ----------------------------------------------------------------------------------
        def set_vtc(self, vtc_method: Any = None, vtc_config: Any = None) -> None:
            """Switch method (``none`` removes every hook) and clear the recorded statistics."""
            label, spec = parse_vtc_args(vtc_method, vtc_config)
            self.set_vtc_spec(label, spec)

        def set_vtc_spec(self, label: str | None, spec: Any) -> None:
            import vtc
            from vtc.eval.flops_cli import describe_methods

            if self._handle is not None:
                self._handle.remove()
                self._handle = None
            self._spec = spec
            self._info = describe_methods(label, spec)
            if spec is not None:
                self._handle = vtc.apply(self.model, spec)
            self.reset_vtc_stats()

        def reset_vtc_stats(self) -> None:
            self._records = []
            self._merged = None

        @property
        def vtc_handle(self):
            return self._handle

        def _record(
            self, task: str, stats, prefill_ms: float | None, skip_rows=(), kv_shared_prefill: str = "last"
        ) -> None:
            """One record per row: ``(task, stats, prefill_ms, kv_shared_prefill)``; the last says how many
            positions ran through KV-shared layers (``"last"`` under ``generate()``, ``"all"`` in a forward)."""
            from vtc.eval.bench import row_stats

            for b in range(stats.batch_size):
                if b in skip_rows:
                    continue
                self._records.append(
                    (str(task), row_stats(stats, b).to_dict(), prefill_ms, kv_shared_prefill)
                )

        def _gather(self) -> list[tuple[str, dict, float | None, str]]:
            records = list(self._records)
            if self._world_size > 1:
                import torch.distributed as dist

                if dist.is_available() and dist.is_initialized():
                    parts: list = [None] * dist.get_world_size()
                    dist.all_gather_object(parts, records)
                else:
                    from accelerate.utils import gather_object

                    parts = gather_object([records])
                records = [r for part in parts for r in (part or [])]
            return records

        def vtc_block(self) -> dict:
            """The ``"vtc"`` results block for everything recorded since the last method switch."""
            from vtc.engine.stats import CallStats
            from vtc.eval.results import TaskAccumulator, build_vtc_block

            records = self._merged if self._merged is not None else self._records
            bpe = torch.empty((), dtype=self._dtype()).element_size()
            per_task: dict[str, TaskAccumulator] = {}
            for task, stats, ms, *mode in records:
                acc = per_task.get(task)
                if acc is None:
                    acc = per_task[task] = TaskAccumulator(
                        self._dims, include_vision=self.include_vision, bytes_per_element=bpe
                    )
                acc.add(CallStats(**stats), prefill_ms=ms, kv_shared_prefill=mode[0] if mode else "last")
            return build_vtc_block(
                self._info.label,
                preset=self._info.preset,
                config=self._info.config,
                model=self.pretrained,
                per_task={t: a.result() for t, a in per_task.items()},
            )

        def _dtype(self):
            model = getattr(self, "_model", None)
            if model is not None:
                return next(self.model.parameters()).dtype
            return getattr(self, "_last_dtype", torch.float32)

        def clean(self):
            """Called by lmms-eval on every rank after the last request: gather stats, then free memory."""
            self._last_dtype = self._dtype()
            self._merged = self._gather()
            if self._rank == 0:
                _PENDING["block"] = self.vtc_block()
            if self.keep_model_after_eval:
                acc = getattr(self, "accelerator", None)
                if acc is not None and hasattr(acc, "free_memory"):
                    acc.free_memory()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                return
            if self._handle is not None:
                self._handle.remove()
                self._handle = None
            super().clean()

        # ---- prompts ------------------------------------------------------------------------------
        def _template_prompt(self, text: str) -> str:
            messages = [{"role": "user", "content": text}]
            tok = self._tokenizer
            if self.chat_template is not None:
                return tok.apply_chat_template(
                    messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
                )
            if getattr(tok, "chat_template", None):
                return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return FALLBACK_TEMPLATE.format(prompt=text)

        def _simple_prompt(self, context: str, n_images: int) -> str:
            if n_images and IMAGE_PLACEHOLDER not in context:
                context = " ".join([IMAGE_PLACEHOLDER] * n_images) + "\n" + context
            return self._template_prompt(context)

        def _chat_prompt(self, messages) -> tuple[str, list]:
            """Prompt text and images of one lmms-eval ``ChatMessages``."""
            images, videos, _ = messages.extract_media()
            if videos:
                raise NotImplementedError(f"{MODEL_ID} handles images only; got {len(videos)} video(s)")
            hf = []
            for m in messages.messages:
                content = []
                for c in m.content:
                    if c.type == "image":
                        content.append({"type": "image"})
                    elif c.type == "text":
                        content.append({"type": "text", "text": c.text})
                hf.append({"role": m.role, "content": content})
            proc_template = getattr(self._processor, "chat_template", None)
            if self.chat_template is None and proc_template:
                return self._processor.apply_chat_template(
                    hf, tokenize=False, add_generation_prompt=True
                ), images
            # no processor template: flatten the user turns, images first
            text = "\n".join(c["text"] for m in hf for c in m["content"] if c["type"] == "text")
            return self._simple_prompt(text, len(images)), images

        # ---- generation -----------------------------------------------------------------------------
        def _doc(self, task, split, doc_id):
            return self.task_dict[task][split][doc_id]

        def _prepare(self, req) -> tuple[str, list, dict, str]:
            """``(prompt, images, gen_kwargs, task)`` of one ``generate_until`` request."""
            if self.is_simple:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
                visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else []
                visuals = [v for v in (visuals or []) if v is not None]
                if any(isinstance(v, str) for v in visuals):
                    raise NotImplementedError(f"{MODEL_ID} handles images only; got a video path")
                return self._simple_prompt(context, len(visuals)), visuals, gen_kwargs, task
            from lmms_eval.protocol import ChatMessages

            _ctx, doc_to_messages, gen_kwargs, doc_id, task, split = req.args
            raw = doc_to_messages(self._doc(task, split, doc_id))
            prompt, images = self._chat_prompt(ChatMessages(messages=raw))
            return prompt, images, gen_kwargs, task

        @staticmethod
        def _gen_settings(gen_kwargs: dict) -> tuple[dict, list[str]]:
            gk = dict(gen_kwargs or {})
            until = gk.pop("until", None)
            if until is None:
                until = []
            elif isinstance(until, str):
                until = [until]
            elif not isinstance(until, (list, tuple)):
                raise ValueError(
                    f"gen_kwargs['until'] must be a string or a list, got {type(until).__name__}"
                )
            temperature = float(gk.pop("temperature", 0) or 0)
            do_sample = bool(gk.pop("do_sample", False)) or temperature > 0
            settings = {
                "max_new_tokens": int(gk.pop("max_new_tokens", 1024)),
                "do_sample": do_sample,
                "num_beams": int(gk.pop("num_beams", 1) or 1),
            }
            if do_sample:
                settings["temperature"] = temperature
                if gk.get("top_p") is not None:
                    settings["top_p"] = float(gk["top_p"])
            return settings, [u for u in until if u]

        def generate_until(self, requests) -> list:
            from vtc.eval.bench import ForwardClock, unpatched_stats

            if not requests:
                return []
            import vtc

            prepared = [self._prepare(r) for r in requests]
            groups: dict[tuple, list[int]] = {}
            for i, (_p, _im, gk, task) in enumerate(prepared):
                key = (task, json.dumps(gk, sort_keys=True, default=str))
                groups.setdefault(key, []).append(i)
            batches = []
            for idx in groups.values():
                idx.sort(key=lambda i: -len(prepared[i][0]))
                for s in range(0, len(idx), self.batch_size):
                    batches.append(idx[s : s + self.batch_size])
            results: list[Any] = [None] * len(requests)
            adapter = vtc.get_adapter(self.model)
            clock = ForwardClock(self.model, self._device)
            pad_id = self._tokenizer.pad_token_id
            if pad_id is None:
                pad_id = self.eot_token_id
            elapsed, n_tokens = 0.0, 0
            pbar = tqdm(total=len(batches), disable=(self.rank != 0), desc=f"{MODEL_ID} ({self._info.label})")
            try:
                for batch in batches:
                    prompts = [prepared[i][0] for i in batch]
                    images = [im for i in batch for im in prepared[i][1]]
                    if images and getattr(adapter, "images_per_prompt", False):
                        images = [
                            list(prepared[i][1]) for i in batch
                        ]  # Gemma's processors: one list per prompt
                    task = prepared[batch[0]][3]
                    settings, until = self._gen_settings(prepared[batch[0]][2])
                    enc = self._processor(
                        images=images or None, text=prompts, return_tensors="pt", padding=True
                    )
                    enc = {
                        k: (v.to(self._device, self._dtype()) if k == "pixel_values" else v.to(self._device))
                        for k, v in enc.items()
                    }
                    if not getattr(adapter, "uses_image_sizes", False):  # LLaVA-NeXT-style layouts need them
                        enc.pop("image_sizes", None)
                    t0 = time.perf_counter()
                    with torch.inference_mode():
                        clock.start()
                        out = self.model.generate(
                            **enc,
                            **settings,
                            use_cache=self.use_cache,
                            pad_token_id=pad_id,
                            eos_token_id=self.eot_token_id,
                        )
                        clock.stop()
                    elapsed += time.perf_counter() - t0
                    T = enc["input_ids"].shape[1]
                    new = out[:, T:]
                    if self._handle is not None and self._handle.stats is not None:
                        stats = self._handle.stats
                    else:
                        stats = unpatched_stats(
                            enc["input_ids"],
                            enc.get("attention_mask"),
                            adapter.image_token_id,
                            adapter.num_layers,
                            max(new.shape[1] - 1, 0),
                            adapter.tokens_per_image(),
                            visual=adapter.visual_mask(enc["input_ids"]),
                        )
                    skip = {
                        b for b, i in enumerate(batch) if (requests[i].metadata or {}).get("__padding_only__")
                    }
                    self._record(task, stats, clock.prefill_ms, skip)
                    texts = self._tokenizer.batch_decode(new, skip_special_tokens=True)
                    for b, i in enumerate(batch):
                        text = texts[b]
                        for stop in until:
                            text = text.split(stop, 1)[0]
                        n_out = int((new[b] != pad_id).sum().item()) if pad_id is not None else new.shape[1]
                        n_tokens += n_out
                        results[i] = GenerationResult(
                            text=text, token_counts=TokenCounts(output_tokens=n_out)
                        )
                        self.cache_hook.add_partial("generate_until", (prompts[b], prepared[i][2]), text)
                    pbar.update(1)
            finally:
                clock.remove()
                pbar.close()
            try:
                from lmms_eval.models.model_utils.gen_metrics import log_metrics

                log_metrics(
                    total_elapsed_time=elapsed,
                    total_gen_tokens=n_tokens,
                    avg_speed=n_tokens / elapsed if elapsed > 0 else 0.0,
                    additional_metrics={"rank": self.rank},
                )
            except Exception:  # noqa: BLE001 - metrics logging is optional
                pass
            return results

        def loglikelihood(self, requests) -> list:
            """Mean negative log-likelihood of the continuation's tokens (the loss with the context labelled -100,
            as lmms-eval's ``llava_hf`` returns it: ``multiple_choice`` picks the lowest) and whether greedy decoding
            gives the continuation, as ``GenerationResult(text=(loss, greedy))``; one request at a time. Under any vtc method the logits are at the prompt's
            positions (the engine's output contract), so the labels line up with the continuation."""
            import vtc
            from vtc.eval.bench import unpatched_stats

            adapter = vtc.get_adapter(self.model)
            out: list = []
            for req in tqdm(requests, disable=(self.rank != 0), desc=f"{MODEL_ID} loglikelihood"):
                context, target, doc_to_visual, doc_id, task, split = req.args
                doc = self._doc(task, split, doc_id)
                continuation = target if isinstance(target, str) else target(doc)
                visuals = [v for v in (doc_to_visual(doc) or []) if v is not None] if doc_to_visual else []
                prompt = self._simple_prompt(context, len(visuals))
                full = self._processor(
                    images=visuals or None, text=[prompt + continuation], return_tensors="pt"
                )
                ctx = self._processor(images=visuals or None, text=[prompt], return_tensors="pt")
                n_ctx = ctx["input_ids"].shape[1]
                full = {
                    k: (v.to(self._device, self._dtype()) if k == "pixel_values" else v.to(self._device))
                    for k, v in full.items()
                }
                if not getattr(adapter, "uses_image_sizes", False):
                    full.pop("image_sizes", None)
                ids = full["input_ids"]
                labels = ids.clone()
                labels[:, :n_ctx] = -100
                with torch.inference_mode():
                    res = self.model(**full, labels=labels, use_cache=False)
                cont = ids[:, n_ctx:]
                pred = res.logits[:, n_ctx - 1 : ids.shape[1] - 1]
                greedy = bool((pred.argmax(-1) == cont).all().item())
                # lmms-eval's evaluator passes every response through unwrap_generation_output, which turns a bare
                # (float, bool) tuple into its string; a GenerationResult carries the pair through unchanged
                out.append(GenerationResult(text=(float(res.loss.item()), greedy)))
                stats = (
                    self._handle.stats
                    if self._handle is not None and self._handle.stats is not None
                    else None
                )
                if stats is None:
                    stats = unpatched_stats(
                        ids,
                        full.get("attention_mask"),
                        adapter.image_token_id,
                        adapter.num_layers,
                        0,
                        adapter.tokens_per_image(),
                        visual=adapter.visual_mask(ids),
                    )
                self._record(task, stats, None, kv_shared_prefill="all")  # a forward over every position
            return out

        def generate_until_multi_round(self, requests):
            raise NotImplementedError(f"{MODEL_ID} does not implement multi-round generation")

    class VtcLlavaHfChat(VtcLlavaHf):
        """Chat mode (lmms-eval's default for this model): prompts come from the task's chat messages."""

        is_simple = False

    VtcLlavaHf.__module__ = __name__
    VtcLlavaHfChat.__module__ = __name__
    VtcLlavaHf.__qualname__ = "VtcLlavaHf"
    VtcLlavaHfChat.__qualname__ = "VtcLlavaHfChat"
    _CLASSES["VtcLlavaHf"] = VtcLlavaHf
    _CLASSES["VtcLlavaHfChat"] = VtcLlavaHfChat


# VtcLlavaHf and VtcLlavaHfChat are module attributes built on first access (see __getattr__).
__all__ = ["MANIFEST", "MODEL_ID", "parse_vtc_args", "take_pending_block"]
