"""The `squeeze` command line: thin click shells over the library. Errors print one line and exit 2."""
import json
import os
import sys
import tempfile
from functools import wraps
from pathlib import Path

import click

from . import decoder
from .checkpoint import load_checkpoint
from .compiler import __version__, compile_state_dict
from .errors import SqueezeError
from .inspect import inspect as inspect_artifact, render
from .loader import load as load_artifact, read_artifact
from .recipe import Recipe


def _friendly(fn):
    """Turn SqueezeError (and unreadable paths) into `squeeze: error: <one line>` with exit status 2."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SqueezeError as e:
            click.echo(f"squeeze: error: {e}", err=True)
            sys.exit(2)
    return wrapper


def write_atomically(path: str, data: bytes, check=None):
    """Write to a temporary file beside `path`, optionally re-read and check it, then rename: a crash or a failed
    check never leaves a partial or wrong file at `path`, and never touches an existing one."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
@_friendly
def compile(checkpoint, recipe_path, output, verbose):
    """Compile CHECKPOINT (.pt state dict or .safetensors) into an artifact."""
    recipe = Recipe.load(recipe_path) if recipe_path else Recipe()
    if not Path(output).parent.exists() and str(Path(output).parent) not in ("", "."):
        raise SqueezeError(f"{output}: directory {Path(output).parent} does not exist")
    state_dict = load_checkpoint(checkpoint)
    log = None
    if verbose:
        def log(r):
            click.echo(f"  {r.name:<9} {r.seconds:8.2f} s  {r.bytes_in:>12,} B -> {r.bytes_out:>12,} B", err=True)
    result = compile_state_dict(state_dict, recipe, log=log)
    # The written file is re-read and fully decoded before it replaces anything.
    write_atomically(output, result.blob, check=load_artifact)
    params = sum(t.numel() for t in state_dict.values())
    click.echo(f"{output}: {len(result.blob):,} bytes, {len(state_dict)} tensors, {params:,} params, "
               f"{8 * len(result.blob) / max(params, 1):.3f} bits/param (recipe {recipe.name})")


@main.command()
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@_friendly
def inspect(artifact, as_json):
    """Show where every byte of ARTIFACT went."""
    report = inspect_artifact(artifact)
    click.echo(json.dumps(report.to_dict(), indent=1) if as_json else render(report))


@main.command("emit-decoder")
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Python file to write.")
@_friendly
def emit_decoder(artifact, output):
    """Write a tiny standalone decoder (numpy + torch) for ARTIFACT's codecs."""
    source = decoder.emit(decoder.codecs_used(read_artifact(artifact)))
    write_atomically(output, source.encode("utf-8"))
    click.echo(f"{output}: {len(source.encode('utf-8')):,} bytes; load(path) -> dict of tensors")


if __name__ == "__main__":
    main()
