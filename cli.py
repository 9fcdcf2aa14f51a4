"""The `tokenfuse` command: one tool, subcommands that compose, flags that mean the same everywhere."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

from . import __version__


def _token_counts(example: str):
    """An argparse type for comma-separated token counts (`example`: what to give instead)."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated token counts, e.g. {example}")
    return parse


_schedule = _token_counts("177,160,145 (tokens leaving each layer)")
_lengths = _token_counts("96,128,192 (bucket lengths)")


def _r(text: str):
    from .exporter.budgets import parse_r

    return _as_argument_error(parse_r, text)


def _add_export(sub):
    from .exporter.buckets import LENGTHS, UNMERGED_UP_TO
    from .exporter.registry import method_names

    p = sub.add_parser(
        "export",
        help="export a token-merged model to validated ONNX + a JSON manifest",
        description="Export a token-merged model to ONNX (dynamic batch, static token budgets, TensorRT-importable ops), "
        "validate it in ONNX Runtime against PyTorch and write the manifest beside it.",
    )
    p.add_argument("--model", required=True, help="timm:NAME (timm's pretrained weights, from the Hugging Face cache or a download) or hf:DIR|ORG/NAME (a local Hugging Face directory or a hub id)")
    p.add_argument("-o", "--output", required=True, help="output .onnx path; the manifest is written beside it as .json")
    p.add_argument("--method", default="pitome", choices=method_names(), help="merge method (default: pitome; none = unmerged baseline)")
    budget = p.add_argument_group("token budget")
    budget.add_argument("--r", type=_r, help="fraction of tokens kept per layer in (0,1) (PiToMe, e.g. 0.9) or tokens removed per layer >= 1 (ToMe, e.g. 13); default 0.9")
    budget.add_argument("--schedule", type=_schedule, help="explicit tokens leaving each layer, comma separated")
    budget.add_argument("--min-tokens", type=int, help="never keep fewer tokens than this")
    model = p.add_argument_group("model")
    model.add_argument("--weights", help="state dict (.pth/.pt/.safetensors) for a timm model")
    model.add_argument("--random-init", action="store_true", help="random weights for a timm model (timm's initialisation with torch seed 0: the same every time; no download)")
    model.add_argument("--seq-len", type=int, help="one fixed sequence length for a text model (default: length-adaptive BERT-family "
                       "exports, one graph per length bucket; 77 for CLIP text)")
    model.add_argument("--max-seq-len", type=int, help="longest input of a length-adaptive export (default: the model's, e.g. "
                       "sentence-transformers' max_seq_length)")
    model.add_argument("--unmerged-up-to", type=int, default=UNMERGED_UP_TO, help="length-adaptive exports: texts of at most this many "
                       f"tokens run unmerged at their natural length (default {UNMERGED_UP_TO}, measured: docs/length-buckets.md; 0: none forced unmerged, "
                       "each bucket merging where it pays; with --always-merge, every length merged)")
    model.add_argument("--buckets", type=_lengths, help="length-adaptive exports: the bucket lengths, comma separated (default "
                       f"{','.join(map(str, LENGTHS))} up to --max-seq-len; more buckets: less padding, more graphs and engines, more real tokens merged at the same --r)")
    model.add_argument("--always-merge", action="store_true", help="length-adaptive exports: merge every text longer than --unmerged-up-to "
                       "in its bucket (default: texts too short for the merges to pay for their padding to the bucket run unmerged "
                       "at their natural length, by a FLOPs estimate measured in docs/length-buckets.md)")
    model.add_argument("--tower", choices=("vision", "text"), default="vision", help="CLIP tower to export (default vision)")
    model.add_argument("--metric", choices=("keys", "hidden"), help="similarity measured on attention keys or hidden states (default: keys; hidden for CLIP)")
    model.add_argument("--prop-attn", action=argparse.BooleanOptionalAction, help="proportional attention: add log(size) to the attention logits (default: on; off for MAE-style models)")
    _add_knobs(p.add_argument_group("method knobs (papers' defaults; a knob of another method than --method is ignored)"))
    out = p.add_argument_group("output")
    out.add_argument("--opset", type=int, default=18, help="ONNX opset, >= 17 (default 18)")
    out.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="compute precision; fp16 keeps similarity, energy, softmax sums and sizes in fp32 (default fp32)")
    out.add_argument("--no-validate", dest="validate", action="store_false", help="skip the ONNX Runtime vs PyTorch check")
    out.add_argument("--seed", type=int, help="seed of the validation inputs (default: fresh)")
    out.add_argument("--lowering", choices=("onnx", "plugin"), default="onnx",
                     help="onnx: each merge as standard ONNX ops (default); plugin: one SimilarityEnergyMerge node per merge "
                     "for the tokenfuse TensorRT plugin, with a reference ONNX function so ONNX Runtime still runs it")
    p.set_defaults(run=_run_export)


def _add_knobs(group):
    """One flag per method knob in the registry (default None: the method's own default applies)."""
    from .exporter.registry import all_knobs

    for name, (knob, owners) in all_knobs().items():
        group.add_argument(knob.flag, dest=name, type=functools.partial(_knob_value, knob), default=None, choices=knob.choices,
                           metavar=None if knob.choices else name.split("_")[-1].upper(), help=f"{knob.help} ({', '.join(owners)}; default {knob.default})")


def _knob_value(knob, text):
    try:
        return knob.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def _run_export(args) -> int:
    from .exporter import export
    from .exporter.buckets import describe_lengths
    from .exporter.registry import all_knobs

    knobs = {name: getattr(args, name) for name in all_knobs() if getattr(args, name) is not None}
    knobs.update({key: getattr(args, key) for key in ("min_tokens", "prop_attn", "metric")})
    result = export(
        args.model, args.output, method=args.method, r=args.r, schedule=args.schedule, weights=args.weights, random_init=args.random_init,
        seq_len=args.seq_len, tower=args.tower, opset=args.opset, dtype=args.dtype, validate=args.validate, seed=args.seed,
        lowering=args.lowering, max_seq_len=args.max_seq_len, unmerged_up_to=args.unmerged_up_to, buckets=args.buckets,
        always_merge=args.always_merge,
        **knobs,
    )
    for bucket in result.get("buckets") or [result]:
        where = bucket.get("file", args.output)
        if bucket.get("natural_length"):
            print(f"wrote {where}: unmerged, texts of {describe_lengths(bucket['lengths'])} tokens at their natural length")
            continue
        budget = bucket["budget"]
        texts = f", texts of {describe_lengths(bucket['lengths'])} tokens" if "lengths" in bucket else ""
        print(f"wrote {where}: {bucket['method']}, tokens {budget['layers'][0]['tokens_in']} -> {bucket['schedule'][-1]}, "
              f"FLOPs ratio {budget['flops_ratio']:.3f}{texts}")
    return 0


def _add_build(sub):
    p = sub.add_parser(
        "build",
        help="build a TensorRT engine from an exported model",
        description="Build a TensorRT engine (full TensorRT when importable, TensorRT-RTX otherwise) with an "
        "optimisation profile over the batch axis and a timing cache; write a sidecar manifest beside it. "
        "A length-adaptive text export gets one engine per length bucket (NAME.engine, NAME.lenL.engine, "
        "NAME.natural.engine), and NAME.engine.json lists them for the runtime.",
    )
    p.add_argument("onnx", help="an .onnx written by tokenfuse export (its .json manifest is read when present)")
    p.add_argument("-o", "--output", required=True, help="the .engine path; the sidecar goes beside it as .engine.json")
    p.add_argument("--batch", default="1:8:32", type=_batch_profile, help="min:opt:max batch sizes of the profile (default 1:8:32)")
    p.add_argument("--plugins", default="auto", help="auto (load the plugin library when the model needs it), none, or a library PATH")
    p.add_argument("--timing-cache", help="timing cache file (default: ~/.cache/tokenfuse/timing-<flavour>-<version>.cache)")
    p.set_defaults(run=_run_build)


def _batch_profile(text):
    from .engines.build import parse_batch

    return _as_argument_error(parse_batch, text)


def _batch_list(text):
    from .engines.bench import parse_batches

    return _as_argument_error(parse_batches, text)


def _as_argument_error(parse, text):
    from .exporter.errors import UsageError

    try:
        return parse(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def _run_build(args) -> int:
    from .engines.build import build_engine

    sidecar = build_engine(args.onnx, args.output, batch=args.batch, plugins=args.plugins, timing_cache=args.timing_cache)
    trt, buckets = sidecar["tensorrt"], sidecar.get("buckets") or []
    engines = f" and {len(buckets) - 1} more engines ({', '.join(b['file'] for b in buckets[:-1])})" if len(buckets) > 1 else ""
    print(f"wrote {args.output}{engines}: {trt['flavour']} {trt['version']}, batch {args.batch[0]}:{args.batch[1]}:{args.batch[2]}")
    return 0


def _add_bench(sub):
    p = sub.add_parser(
        "bench",
        help="benchmark a merged model against its unmerged baseline",
        description="Run the merged model and the unmerged baseline interleaved in one run (exporting the baseline "
        "when none is given: a text encoder at natural lengths, each batch padded to its longest, as it is served today; "
        "an image model with --method none); report latency percentiles, throughput and the speedup beside the "
        "FLOPs-ratio ideal, on random full-size inputs or on your own items (--data).",
    )
    p.add_argument("model", help="an .onnx (ONNX Runtime) or .engine (TensorRT)")
    p.add_argument("--baseline", help="the unmerged model (default: exported by bench, see above)")
    p.add_argument("--data", help="measure on these items at their real lengths, in batches in file order: a text file (one text per "
                   "line, or fastText __label__ lines), JSONL ('text') or a folder of images, as for tune")
    p.add_argument("--batch", default="1,8,32", type=_batch_list, help="batch sizes (default 1,8,32)")
    p.add_argument("--backend", choices=("ort", "trt"), help="ort for .onnx, trt for .engine (default: from the file; a check)")
    p.add_argument("--providers", help="ONNX Runtime providers, comma separated (default: TensorRT, CUDA, CPU as available)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--plugins", help="the plugin library an engine needs (default: the path in its sidecar)")
    p.add_argument("--min-rounds", type=int, default=20, help="rounds before the medians may be called stable (default 20)")
    p.add_argument("--seconds", type=float, default=60.0, help="time limit per batch size (default 60)")
    p.add_argument("--open-first", choices=("model", "baseline"), default="model", help="which of the two is loaded first (default "
                   "model); on a small CPU the order moved batch-1 speedups by 3-7%%: run each order to see it")
    p.add_argument("--json", help="write the report as JSON")
    p.add_argument("--plot", help="write a PNG plot of latency and speedup")
    p.add_argument("--profile", action="store_true", help="instead of timing: ONNX Runtime's per-operator CPU profile of the model "
                   "and its baseline at the first --batch, by op type (what the merge itself costs); --json keeps it")
    p.set_defaults(run=_run_bench)


def _run_bench(args) -> int:
    from pathlib import Path

    from .engines import bench
    from .exporter.errors import UsageError

    from .engines.runtime import BACKENDS, backend_for

    if args.backend and backend_for(Path(args.model)).flag != args.backend:
        runs = "; ".join(f"{b.flag} runs {'/'.join(b.suffixes)}" for b in BACKENDS)
        raise UsageError(f"--backend {args.backend} does not run a {Path(args.model).suffix} file; {runs}")
    unused = [flag for flag, value in (("--data", args.data), ("--plot", args.plot), ("--providers", args.providers), ("--plugins", args.plugins)) if value]
    if args.profile and unused:
        raise UsageError(f"{', '.join(unused)}: not used by bench --profile (ONNX Runtime on the CPU, random full-size inputs)")
    report = bench.bench(
        args.model, baseline=args.baseline, batches=args.batch,
        providers=args.providers.split(",") if args.providers else None, threads=args.threads, plugins=args.plugins,
        min_rounds=args.min_rounds, max_seconds=args.seconds, data=args.data, profile=args.profile, open_first=args.open_first,
    )
    if args.profile:
        from .engines.profile import markdown

        print(markdown(report))
    else:
        print(bench.markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        bench.plot(report, Path(args.plot))
    return 0


def _add_serve(sub):
    p = sub.add_parser(
        "serve",
        help="serve embeddings and logits over HTTP with dynamic batching",
        description="Serve one or more MODELs over HTTP (FastAPI): tokenfuse's own routes /v1/embed/texts and "
        "/v1/embed/images, the OpenAI embeddings API /v1/embeddings, and the KServe v2 protocol /v2/...; "
        "GET /health, /metrics (Prometheus), /docs (OpenAPI).",
    )
    p.add_argument("model", nargs="+", help="an .onnx or .engine written by tokenfuse (its manifest says how to preprocess), "
                   "served under its file's stem, or NAME=PATH to name it")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="most examples per model call (default 32)")
    p.add_argument("--max-delay-ms", type=float, default=5.0, help="longest wait for a batch to fill (default 5 ms)")
    p.add_argument("--queue-size", type=int, default=256, help="examples that may wait per model; a request that does not fit gets 429 (default 256)")
    p.add_argument("--max-queue-delay-ms", type=float, default=2000.0,
                   help="an admitted request that cannot start within this gets 503 with Retry-After (default 2000; 0: wait without bound)")
    p.add_argument("--max-inputs", type=int, help="texts, images or token lists per request; more get 413 (default 64, at most --queue-size)")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="request body size; larger bodies get 413 (default 16 MiB)")
    p.add_argument("--max-image-pixels", type=int, default=16_000_000, help="pixels per image; larger images get 413 (default 16 million)")
    p.add_argument("--refusal-hold-ms", type=float,
                   help="how long a request refused on arrival (429) waits for its answer, so clients that ignore Retry-After "
                   "cannot spend the CPU the batches need (default: its Retry-After, the queue bound rounded up to seconds; 0: at once)")
    p.add_argument("--health-port", type=int,
                   help="also serve GET /health and /metrics on this port, from a thread of their own: they answer in "
                   "milliseconds at any load (point liveness and readiness probes here)")
    p.add_argument("--max-connections", type=int, default=1000,
                   help="open connections and requests at once; beyond it a plain 503 (uvicorn's limit_concurrency; default 1000)")
    p.add_argument("--providers", help="ONNX Runtime providers, comma separated")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    p.add_argument("--plugins", help="the plugin library an engine needs (default: the path in its sidecar)")
    p.set_defaults(run=_run_serve)


def _run_serve(args) -> int:
    from .engines.serve import serve

    print(f"serving {', '.join(args.model)} on http://{args.host}:{args.port} (docs at /docs)", flush=True)
    serve(args.model, host=args.host, port=args.port, max_batch=args.max_batch, max_delay_ms=args.max_delay_ms,
          queue_size=args.queue_size, max_queue_delay_ms=args.max_queue_delay_ms or None, max_inputs=args.max_inputs,
          max_body_mb=args.max_body_mb, max_image_pixels=args.max_image_pixels, refusal_hold_ms=args.refusal_hold_ms,
          max_connections=args.max_connections, health_port=args.health_port, providers=args.providers.split(",") if args.providers else None, threads=args.threads, plugins=args.plugins)
    return 0


def _add_triton(sub):
    p = sub.add_parser(
        "triton-repo",
        help="write a Triton Inference Server model repository",
        description="Write a Triton model repository for MODEL (.onnx: onnxruntime_onnx, .engine: tensorrt_plan) with "
        "dynamic batching and instance groups; a plugin library the engine needs is copied and preloaded. "
        "A length-adaptive text export (or its engines) gets one model per length bucket.",
    )
    p.add_argument("model", help="an .onnx or .engine written by tokenfuse")
    p.add_argument("-o", "--output", required=True, help="the repository directory (new or empty)")
    p.add_argument("--name", help="model name in the repository (default: the file's stem)")
    p.add_argument("--max-batch", type=int, default=32, help="max_batch_size (default 32; at most an engine's profile max)")
    p.add_argument("--instances", type=int, default=1, help="instances per GPU (default 1)")
    p.add_argument("--kind", choices=("gpu", "cpu"), default="gpu", help="instance kind (default gpu)")
    p.add_argument("--max-delay-us", type=int, default=5000, help="dynamic batching queue delay (default 5000 us)")
    p.set_defaults(run=_run_triton)


def _run_triton(args) -> int:
    from .engines.triton import write_repository

    folders = write_repository(args.model, args.output, name=args.name, max_batch=args.max_batch, instances=args.instances,
                               kind=args.kind, delay_us=args.max_delay_us)
    models = f"{folders[0]}/config.pbtxt" if len(folders) == 1 else f"{len(folders)} models, one per length bucket ({', '.join(f.name for f in folders)})"
    print(f"wrote {models}; start with: tritonserver --model-repository={args.output} (see its README.md)")
    return 0


def _add_plugin(sub):
    p = sub.add_parser(
        "plugin",
        help="build the TensorRT plugin library, print where it is, or check its kernels on a GPU",
        description="The SimilarityEnergyMerge TensorRT plugin (plugins/README.md): `build` compiles it with CMake and "
        "nvcc; `path` prints the library for --plugins, trtexec --dynamicPlugins or load_library; `check` runs its "
        "kernels on this machine's GPU against the exporter's merge.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = actions.add_parser("build", help="compile the plugin library (CMake, nvcc, TensorRT headers)")
    build.add_argument("--build-dir", help="where the library goes (default: $TOKENFUSE_PLUGIN_DIR or ~/.cache/tokenfuse/plugins-VERSION)")
    build.add_argument("--tensorrt-root", help="TensorRT install whose headers to use (default: $TENSORRT_ROOT, the system, "
                       "JetPack, then the kernel-lens package)")
    build.add_argument("--cuda-archs", help="CMake CUDA architectures (default: 75-real;80-real;86-real;87-real;89-real;90-real;90-virtual)")
    build.add_argument("-j", "--jobs", type=int, help="parallel compile jobs (default: all cores)")
    path = actions.add_parser("path", help="print the built library's path (exit 2 when it is not built)")
    path.add_argument("--build-dir", help="where the library was built (default as for build)")
    check = actions.add_parser("check", help="run the kernels on this machine's GPU against the exporter's PyTorch merge, and time them",
                               description="Builds the kernels for this GPU (no TensorRT needed), checks every method's slots and "
                               "merged tokens against the exporter's PyTorch merge (exact ties, random and non-finite inputs, fp32 "
                               "and fp16), and times each against the same merge in PyTorch ops and ViT-B/16's own block. Exit 1 "
                               "when a check fails.")
    check.add_argument("--quick", action="store_true", help="small correctness inputs only, no timing")
    check.add_argument("--sanitize", action="store_true", help="also run --quick under compute-sanitizer's memcheck, racecheck, synccheck and initcheck")
    check.add_argument("--library", help="a library with the kernels' C entry points (default: build them into --build-dir)")
    check.add_argument("--build-dir", help="where the kernels are built (default as for build)")
    check.add_argument("--report", help="write every figure as Markdown to this file")
    p.set_defaults(run=_run_plugin)


def _run_plugin(args) -> int:
    from pathlib import Path

    from . import plugins
    from .exporter.errors import UsageError

    build_dir = Path(args.build_dir) if args.build_dir else None
    if args.action == "check":
        from .plugins import gpu_check

        if args.library and args.build_dir:
            raise UsageError("give --library (kernels already built) or --build-dir (where to build them), not both")
        if args.library and not Path(args.library).is_file():
            raise UsageError(f"--library {args.library}: no such file; build it with tokenfuse plugin build, or leave --library out")
        failed = gpu_check.check(Path(args.library) if args.library else None, build_dir=build_dir, quick=args.quick, sanitize=args.sanitize, report=Path(args.report) if args.report else None)
        return 1 if failed else 0
    if args.action == "build":
        plugins.build(build_dir, architectures=args.cuda_archs or plugins.DEFAULT_ARCHITECTURES,
                      tensorrt_root=args.tensorrt_root, jobs=args.jobs)
        return 0
    library = plugins.library_path(build_dir)
    if library is None:
        raise UsageError(f"no plugin library in {build_dir or plugins.default_build_dir()}; run: tokenfuse plugin build")
    print(library)
    return 0


def _add_tune(sub):
    p = sub.add_parser(
        "tune",
        help="choose a method and budget on your own data: Pareto front of speedup vs fidelity",
        description="Export every method x budget once, measure its fidelity to the unmerged model on --data through "
        "ONNX Runtime and its speed with bench's interleaved measurement; print the Pareto front, the pick that meets "
        "the target and the tokenfuse export command for it.",
    )
    p.add_argument("--model", required=True, help="timm:NAME or hf:DIR, as for export")
    p.add_argument("--data", required=True, help="a folder of images (class subfolders give labels), a text file (one text per line, "
                   "or fastText __label__X lines) or JSONL ('text', optional 'label')")
    p.add_argument("--methods", help="methods to sweep (default pitome,tome,crossget,turbo; with --lengths one method, default pitome)")
    p.add_argument("--budgets", help="budgets to sweep, comma separated: 0.9 (kept ratio), 8 (tokens removed per layer), "
                   "dec:8 (decreasing schedule, mean r 8); default: 0.95,0.9,0.85,0.8, two r and a decreasing schedule; "
                   "with --lengths one kept fraction, default 0.9")
    p.add_argument("--lengths", action="store_true", help="text models: time the length-adaptive export on --data at every "
                   "--unmerged-up-to that routes its texts differently, against the plain model at natural lengths, and pick one")
    p.add_argument("--max-seq-len", type=int, help="with --lengths: the longest bucket (default: the model's maximum length)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--max-drop", type=float, help="pick the fastest configuration losing at most this much fidelity (default 0.01)")
    target.add_argument("--min-speedup", type=float, help="pick the most faithful configuration at least this much faster")
    p.add_argument("--measure", choices=("agreement", "accuracy", "cosine", "knn"),
                   help="fidelity measure (default: agreement for a classifier, knn (10-nearest-neighbour overlap) for an embedding model)")
    p.add_argument("--batch", type=int, default=8, help="batch size for fidelity and speed (default 8)")
    p.add_argument("--weights", help="state dict for a timm model")
    p.add_argument("--random-init", action="store_true", help="random weights for a timm model (as for export)")
    p.add_argument("--seq-len", type=int, help="fixed sequence length of text models (as for export)")
    p.add_argument("--tower", choices=("vision", "text"), default="vision", help="CLIP tower (default vision)")
    p.add_argument("--time-limit", type=float, help="stop starting new configurations after this many seconds")
    p.add_argument("--seconds", type=float, help="speed measurement limit per configuration (default 10; with --lengths for the whole comparison, default 30)")
    p.add_argument("--min-rounds", type=int, default=20, help="rounds before the speed medians may be called stable (default 20)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--json", help="write the report as JSON")
    p.add_argument("--plot", help="write a PNG plot of the front")
    p.set_defaults(run=_run_tune)


def _run_tune(args) -> int:
    from .engines.tune import DEFAULT_METHODS, tune
    from .exporter.errors import UsageError

    if args.lengths:
        return _run_tune_lengths(args)
    if args.max_seq_len is not None:
        raise UsageError("--max-seq-len is for tune --lengths; a sweep runs at one --seq-len")
    methods = tuple(args.methods.split(",")) if args.methods else DEFAULT_METHODS
    tune(args.model, args.data, methods=methods, budgets=args.budgets, measure=args.measure,
         max_drop=args.max_drop, min_speedup=args.min_speedup, batch=args.batch, weights=args.weights, random_init=args.random_init, seq_len=args.seq_len,
         tower=args.tower, time_limit=args.time_limit, seconds=args.seconds or 10.0, min_rounds=args.min_rounds, threads=args.threads,
         json_path=args.json, plot_path=args.plot)
    return 0


def _run_tune_lengths(args) -> int:
    from .engines.tune_lengths import tune_lengths
    from .exporter.errors import UsageError

    method, budget = args.methods or "pitome", args.budgets or "0.9"
    if "," in method or "," in budget:
        raise UsageError("tune --lengths measures one method at one kept fraction: e.g. --methods pitome --budgets 0.9")
    unused = [flag for flag, value in (("--max-drop", args.max_drop), ("--min-speedup", args.min_speedup), ("--measure", args.measure), ("--weights", args.weights),
                                       ("--random-init", args.random_init), ("--seq-len", args.seq_len), ("--plot", args.plot),
                                       ("--time-limit", args.time_limit)) if value]
    if unused:
        raise UsageError(f"{', '.join(unused)}: not used by tune --lengths (it takes --methods, --budgets, --batch, --max-seq-len, --seconds, --json)")
    try:
        r = float(budget)
    except ValueError:
        raise UsageError(f"--budgets {budget}: tune --lengths takes a kept fraction, e.g. 0.9")
    tune_lengths(args.model, args.data, method=method, r=r, batch=args.batch, max_seq_len=args.max_seq_len,
                 seconds=args.seconds or 30.0, min_rounds=args.min_rounds, threads=args.threads, json_path=args.json)
    return 0


def _add_show(sub):
    from .exporter.registry import method_names

    p = sub.add_parser(
        "show",
        help="draw which patches or words each token stands for, layer by layer",
        description="Run the model with an export's merge settings (from its manifest, or the export options) on one "
        "image or text and draw, for chosen layers, which input patches (PNG) or words (HTML or PNG) each token holds.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="an image file (PNG or JPEG)")
    source.add_argument("--text", help="a text")
    p.add_argument("-o", "--output", required=True, help="output .png (image or text) or .html (text)")
    p.add_argument("--layers", type=_schedule, help="layers to draw, comma separated from 0 (default: up to 4 merging layers, the last included)")
    p.add_argument("--manifest", help="an export's manifest (.json, or the .onnx beside it): its model and merge settings")
    p.add_argument("--model", help="timm:NAME or hf:DIR, with the export options below (instead of --manifest)")
    p.add_argument("--method", default="pitome", choices=method_names())
    p.add_argument("--r", type=_r)
    p.add_argument("--schedule", type=_schedule)
    p.add_argument("--min-tokens", type=int)
    p.add_argument("--weights")
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--tower", choices=("vision", "text"), default="vision")
    p.set_defaults(run=_run_show)


def _run_show(args) -> int:
    from pathlib import Path

    from .engines.show import show
    from .exporter.manifest import Manifest
    from .exporter.errors import UsageError

    if bool(args.manifest) == bool(args.model):
        raise UsageError("give --manifest (an export's settings) or --model with export options, not both")
    source = Path(args.image) if args.image else args.text
    if args.manifest:
        result = show(None, source, args.output, layers=list(args.layers) if args.layers else None,
                      manifest=Manifest.read(args.manifest))
    else:
        result = show(args.model, source, args.output, layers=list(args.layers) if args.layers else None,
                      weights=args.weights, random_init=args.random_init, seq_len=args.seq_len, tower=args.tower, method=args.method, r=args.r,
                      schedule=args.schedule, min_tokens=args.min_tokens)
    print(f"wrote {args.output}: layers {', '.join(map(str, result['layers']))} (tokens per layer {result['schedule']})")
    return 0
class _Parser(argparse.ArgumentParser):
    """Argument errors as every other bad input: one `tokenfuse: error:` line, exit code 2.
    Subcommand parsers are of the same class (argparse's default)."""

    def error(self, message):
        self.exit(2, f"tokenfuse: error: {message}; see {self.prog} --help\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tokenfuse", description="Token-merged transformers as validated ONNX, ready for TensorRT.")
    p.add_argument("--version", action="version", version=f"tokenfuse {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_export(sub)
    _add_build(sub)
    _add_bench(sub)
    _add_serve(sub)
    _add_triton(sub)
    _add_plugin(sub)
    _add_tune(sub)
    _add_show(sub)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from .exporter.errors import UsageError

    try:
        return args.run(args)
    except UsageError as exc:
        print(f"tokenfuse: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tokenfuse: interrupted; nothing written", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("TOKENFUSE_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"tokenfuse: internal error: {type(exc).__name__}: {message} (set TOKENFUSE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
