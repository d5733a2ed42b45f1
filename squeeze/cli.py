"""The `squeeze` command line: thin click shells over the library. Errors print one line and exit 2."""
import json
import os
import sys
from functools import partial, wraps
from pathlib import Path

import click

from . import decoder, memory
from .calibrate import calibration_for
from .checkpoint import load_checkpoint
from .budget import budget_names, compile_to_budget
from .compiler import __version__, compile_state_dict, methods_of
from .errors import SqueezeError
from .export import CHALLENGE_LIMIT
from .files import write_atomically
from .inspect import inspect as inspect_artifact, render
from .loader import check as check_artifact, read_artifact
from .recipe import Recipe
from .verify import record as verify_record, verify as verify_artifact
from .verify import dist
from .verify.eval import pick_device
from .verify.report import render as render_verify


def _friendly(fn, *, prints_errors=lambda: True):
    """Turn SqueezeError (and unreadable paths) into `squeeze: error: <one line>` with exit status 2; the line is
    printed when prints_errors() says so."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SqueezeError as e:
            if prints_errors():
                click.echo(f"squeeze: error: {e}", err=True)
            sys.exit(2)
    return wrapper


def _is_main_rank() -> bool:
    """Rank 0 under torchrun, or a plain process. Every rank reads the same inputs, so all fail alike on a bad one,
    and only rank 0 prints the line."""
    return os.environ.get("RANK", "0") == "0"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="squeeze")
def main():
    """squeeze: compile PyTorch checkpoints into small, self-describing, checksummed artifacts."""


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), default=None,
              help="Recipe TOML (default: the built-in int6/int8 + brotli recipe).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Artifact to write.")
@click.option("-v", "--verbose", is_flag=True, help="Log each pass: time and bytes in/out.")
@click.option("--calib", default=None, help="Calibration token shards for GPTQ, a glob (training data, never val).")
@click.option("--calib-self", default=0, type=click.IntRange(min=0),
              help="Calibrate GPTQ on N sequences the model samples itself (no data needed).")
@click.option("--calib-tokens", default=131072, show_default=True, type=click.IntRange(min=1),
              help="Calibration tokens read from --calib.")
@click.option("--calib-seq-len", default=1024, show_default=True, type=click.IntRange(min=2),
              help="Calibration window (and --calib-self sequence) length.")
@click.option("--model", default="pgolf", show_default=True,
              help="The model calibration runs: pgolf, FILE.py:NAME or package.module:NAME (as verify).")
@click.option("--model-config", type=click.Path(dir_okay=False), default=None, help="JSON config for --model.")
@click.option("--forward", default=None, metavar="NAME",
              help="The model's method that returns logits [batch, seq, vocab] (default: forward_logits if it has "
                   "one, else forward).")
@click.option("--device", default=None, help="Calibration and GPTQ device (default: cuda when available).")
@click.option("--budget", default=None, type=click.IntRange(min=1),
              help="Total bytes (artifact + --code-bytes) never to exceed; the allocator picks each matrix's grid.")
@click.option("--bits-per-param", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Budget as bits per parameter of the checkpoint (instead of --budget).")
@click.option("--code-bytes", default=0, show_default=True, type=click.IntRange(min=0),
              help="Bytes of your code (train script, decoder) that count against --budget.")
@click.option("--code", "code_files", multiple=True, type=click.Path(dir_okay=False),
              help="A file whose bytes count against --budget as the challenge counts them (your train_gpt.py, the "
                   "decoder you paste); repeat for several. Added to --code-bytes.")
@click.option("--sensitivity", default="fisher", show_default=True, type=click.Choice(["fisher", "probe"]),
              help="How --budget weighs tensors: fisher (one backward per calibration sequence) or probe (two "
                   "forwards per tensor, the older, slower measure).")
@click.option("--strict-calib", is_flag=True,
              help="Fail if a quantized matrix gets no GPTQ for want of a usable calibration Hessian.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report (with each matrix's method).")
@_friendly
def compile(checkpoint, recipe_path, output, verbose, calib, calib_self, calib_tokens, calib_seq_len, model,
            model_config, forward, device, budget, bits_per_param, code_bytes, code_files, sensitivity, strict_calib,
            as_json):
    """Compile CHECKPOINT (.pt state dict or .safetensors) into an artifact.

    With --calib or --calib-self, quantized matrices get GPTQ codes (recipe key method, default "auto").
    With --budget (needs calibration), each matrix the recipe's [defaults] govern gets the bit width and clip that
    minimise predicted loss; the artifact plus --code-bytes is never larger than the budget."""
    recipe = Recipe.load(recipe_path) if recipe_path else Recipe()
    if not Path(output).parent.exists() and str(Path(output).parent) not in ("", "."):
        raise SqueezeError(f"{output}: directory {Path(output).parent} does not exist")
    if budget is not None and bits_per_param is not None:
        raise SqueezeError("give --budget or --bits-per-param, not both")
    code_bytes += sum(_code_size(f) for f in code_files)
    state_dict = load_checkpoint(checkpoint)
    params = sum(t.numel() for t in state_dict.values())
    if bits_per_param is not None:
        budget = int(bits_per_param * params / 8)
    if budget is not None and calib is None and not calib_self:
        raise SqueezeError("--budget needs calibration to weigh tensors: add --calib 'train_*.bin' or --calib-self N")
    hessians = calibration = None
    device = str(pick_device(device, dist.from_env()))  # checked: a bad --device is one line, before any work
    if calib is not None or calib_self:
        calibration = calibration_for(state_dict, calib=calib, calib_self=calib_self, model=model,
                                      model_config=model_config, seq_len=calib_seq_len, n_tokens=calib_tokens,
                                      forward=forward, device=device, with_sensitivities=budget is not None,
                                      sensitivity_names=budget_names(state_dict, recipe) if budget else None,
                                      progress=True, sensitivity_method=sensitivity)
        hessians = calibration.hessians
        if verbose:
            click.echo(f"  calibration: {calibration.source}; Hessians of {len(hessians)} matrices", err=True)
    elif strict_calib:
        raise SqueezeError("--strict-calib needs calibration: add --calib 'train_*.bin' or --calib-self N")
    skips = calibration.skipped if calibration is not None else None
    log = None
    if verbose:
        def log(r):
            click.echo(f"  {r.name:<9} {r.seconds:8.2f} s  {r.bytes_in:>12,} B -> {r.bytes_out:>12,} B", err=True)
    if budget is not None:
        rounds = (lambda line: click.echo(f"  {line}", err=True)) if verbose or sys.stderr.isatty() else None
        result = compile_to_budget(state_dict, recipe, budget, sensitivities=calibration.sensitivities,
                                   hessians=hessians, code_bytes=code_bytes, log=log, device=device,
                                   calibration_skips=skips, strict_calib=strict_calib, progress=rounds,
                                   even_loss=calibration.even_loss)
    else:
        memory.keep_large_blocks_mapped()  # freed tensor-sized blocks go back to the OS (squeeze/memory.py)
        result = compile_state_dict(state_dict, recipe, log=log, hessians=hessians, device=device,
                                    calibration_skips=skips, strict_calib=strict_calib)
    # The written file is re-read and fully decoded (tensor by tensor, keeping none) before it replaces anything.
    write_atomically(output, result.blob, check=check_artifact)
    methods = methods_of(result.state)
    total, warnings = len(result.blob) + code_bytes, calibration.warnings() if calibration is not None else []
    warnings += result.warnings
    if budget is None and total > CHALLENGE_LIMIT:
        warnings.append(f"artifact {len(result.blob):,} B + code {code_bytes:,} B = {total:,} B exceeds the "
                        f"challenge's {CHALLENGE_LIMIT:,} B; compile with --budget {CHALLENGE_LIMIT}")
    if as_json:
        click.echo(json.dumps({
            "output": output, "bytes": len(result.blob), "tensors": len(state_dict), "params": params,
            "bits_per_param": round(8 * len(result.blob) / max(params, 1), 4), "recipe": recipe.name,
            "calibration": None if calibration is None else {
                "source": calibration.source, "hessians": len(hessians), "gptq": _gptq_count(methods),
                "quantized_matrices": len(methods)},
            "code_bytes": code_bytes, "total_bytes": total, "warnings": warnings, "matrices": methods,
            "measured": list(result.measured)}, indent=1))
        return
    if verbose and calibration is not None:
        for m in methods:
            click.echo(f"  {m['name']}: {m['method']}" + (f" ({m['why']})" if m["why"] else ""), err=True)
    if calibration is not None:
        fallbacks = [m for m in methods if m["method"] != "gptq"]
        click.echo(f"gptq: {_gptq_count(methods)} of {len(methods)} quantized matrices" +
                   (f"; round-to-nearest for {len(fallbacks)}:" if fallbacks else ""))
        if not verbose:
            for m in fallbacks:
                click.echo(f"  {m['name']}: {m['why']}")
    if result.measured:
        click.echo(f"budget: {len(result.measured)} coarse grid(s) priced on their loss measured on calibration text:")
        for m in result.measured:
            click.echo(f"  {m['name']} {m['grid']}: ΔL {m['measured']:+.2e}, quadratic model {m['predicted']:.2e}")
    click.echo(f"{output}: {len(result.blob):,} bytes, {len(state_dict)} tensors, {params:,} params, "
               f"{8 * len(result.blob) / max(params, 1):.3f} bits/param (recipe {recipe.name})")
    for w in warnings:
        click.echo(f"squeeze: warning: {w}", err=True)


def _code_size(path: str) -> int:
    try:
        return Path(path).stat().st_size
    except OSError as e:
        raise SqueezeError(f"{path}: cannot count code bytes ({e.strerror or e})") from None


def _gptq_count(methods: list) -> int:
    return sum(m["method"] == "gptq" for m in methods)


@main.command()
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@click.option("--verify-report", default=None, type=click.Path(),
              help="squeeze verify's report to take the measured drift from (default: ARTIFACT.verify.json, when "
                   "it exists).")
@_friendly
def inspect(artifact, as_json, verify_report):
    """Show where every byte of ARTIFACT went, and its predicted vs measured drift where known.

    A verify report that is stale (for another artifact) or unreadable is ignored with a one-line note."""
    if verify_report is None and verify_record.default_path(artifact).exists():
        verify_report = verify_record.default_path(artifact)
    report = inspect_artifact(artifact, verify_report=verify_report)
    click.echo(json.dumps(report.to_dict(), indent=1) if as_json else render(report))


@main.command()
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("--ckpt", "checkpoint", required=True, type=click.Path(dir_okay=False),
              help="The checkpoint the artifact was compiled from.")
@click.option("--val", required=True, help="Validation shards, a glob (quote it), e.g. 'data/fineweb_val_*.bin'.")
@click.option("--tokenizer", required=True, type=click.Path(dir_okay=False), help="SentencePiece .model file.")
@click.option("--val-bytes", default=None, metavar="GLOB",
              help="CaseOps byte sidecars (one byte count per val token), e.g. 'data/fineweb_val_bytes_*.bin'; "
                   "'none': the tokenizer's byte table. Default: the X_bytes_N.bin beside each X_N.bin, if any.")
@click.option("--model", default="pgolf", show_default=True,
              help="pgolf (the baseline GPT), or your own: FILE.py:NAME or package.module:NAME.")
@click.option("--model-config", type=click.Path(dir_okay=False), default=None,
              help="JSON object: pgolf config overrides (rope_base, logit_softcap, ...) or your model's config.")
@click.option("--forward", default=None, metavar="NAME",
              help="The model's method that returns logits [batch, seq, vocab] (default: forward_logits if it has "
                   "one, else forward).")
@click.option("--seq-len", default=1024, show_default=True, type=click.IntRange(min=1), help="Window length.")
@click.option("--stride", default=None, type=click.IntRange(min=1),
              help="Sliding windows advancing by this many tokens (default: non-overlapping windows).")
@click.option("--max-tokens", default=None, type=click.IntRange(min=1),
              help="Score at most this many tokens, from the start of the stream.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Windows per forward pass.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available).")
@click.option("--max-drift", default=None, type=float,
              help="Exit with status 1 when decoded val_bpb exceeds the original's by more than this.")
@click.option("--mirror", is_flag=True,
              help="Also score 2*W - decoded (the error with its sign flipped) and split the drift into its even "
                   "part (curvature, what quantization choices move) and odd part (the validation gradient along "
                   "the error: luck). One more scoring pass.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False),
              help="Write the JSON report here (default: ARTIFACT.verify.json, where inspect looks for it).")
@click.option("--no-report", is_flag=True, help="Write no report file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@partial(_friendly, prints_errors=_is_main_rank)
def verify(artifact, checkpoint, val, tokenizer, val_bytes, model, model_config, forward, seq_len, stride,
           max_tokens, batch_size, device, max_drift, mirror, as_json, report_path, no_report, quiet):
    """Score the --ckpt weights and ARTIFACT's decoded weights on the validation shards: val_loss, val_bpb, drift.

    The report (the --json document) is also written to ARTIFACT.verify.json, atomically, where `squeeze inspect`
    shows it beside the drift the budget allocator predicted. Under torchrun (torchrun --nproc_per_node=N -m squeeze
    verify ...) the windows are split across processes and only rank 0 prints and writes.
    """
    if report_path is not None and no_report:
        raise SqueezeError("give --report PATH or --no-report, not both")
    if report_path is not None:  # fail before the long measurement, not after it
        _check_report_directory(report_path)
    result = verify_artifact(artifact, checkpoint, val, tokenizer, model=model, model_config=model_config,
                             forward=forward, seq_len=seq_len, stride=stride, max_tokens=max_tokens,
                             batch_size=batch_size, device=device, progress=not quiet, val_bytes=val_bytes,
                             mirror=mirror)
    main_rank = _is_main_rank()
    if main_rank:
        report = verify_record.document(result, max_drift)
        click.echo(json.dumps(report, indent=1) if as_json else render_verify(result))
        if not no_report:
            path = report_path if report_path is not None else verify_record.default_path(artifact)
            if _write_verify_report(report, path, explicit=report_path is not None) and not as_json:
                click.echo(f"report {path}")
    if max_drift is not None and result.drift_exceeds(max_drift):
        if main_rank:
            click.echo(f"squeeze: val_bpb drift {result.drift_bpb:+.6f} exceeds --max-drift {max_drift}", err=True)
        sys.exit(1)


def _check_report_directory(path: str) -> None:
    parent = Path(path).parent
    if not parent.is_dir():
        raise SqueezeError(f"--report {path}: directory {parent} does not exist")


def _write_verify_report(report: dict, path, explicit: bool) -> bool:
    """Write the report atomically; True when written. A --report path that cannot be written is an error; the
    default one beside the artifact (say, in a read-only directory) only warns, because the measurement itself
    succeeded and its exit status (the --max-drift gate) should stand."""
    try:
        write_atomically(str(path), verify_record.encode(report))
    except OSError as e:
        message = f"{path}: cannot write the verify report ({e.strerror or e})"
        if explicit:
            raise SqueezeError(message) from None
        click.echo(f"squeeze: warning: {message}; give --report PATH or --no-report", err=True)
        return False
    return True


@main.command("emit-decoder")
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Python file to write.")
@click.option("--wrap", "how", type=click.Choice(decoder.WRAPS), default="none", show_default=True,
              help="lzma|brotli: one line that exec's the compressed source (base85), to paste into a script.")
@_friendly
def emit_decoder(artifact, output, how):
    """Write a tiny standalone decoder (numpy + torch) for ARTIFACT's codecs and format features. It defines one
    name, squeeze_load(path_or_bytes) -> {name: tensor}, plainly or (--wrap) self-extracting."""
    source = decoder.emit_for(artifact)
    text = decoder.wrap(source, how).encode("utf-8")
    write_atomically(output, text)
    of = "" if how == "none" else f" ({how}+base85 of {len(source.encode('utf-8')):,})"
    click.echo(f"{output}: {len(text):,} bytes{of}; {decoder.NAME}(path_or_bytes) -> dict of tensors")


if __name__ == "__main__":
    main()
