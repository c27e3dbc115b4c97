"""Loading model, tokenizer and embedder folders: the one place every loader in tasks/ and
eval/ goes through, so two rules hold everywhere.

- Weights come from safetensors only (`use_safetensors=True`). A folder holding pickle
  weights and no safetensors (pytorch_model.bin, *.pt) is bad input, refused before
  transformers is called: unpickling a file can run any code it carries.
- `trust_remote_code` is always passed, as the run's `RunSpec.trust_remote_code`: False
  unless the command line had `--trust-remote-code` (a spec file cannot set it, see
  data_specs/spec.py). A folder whose config names its own Python code (`auto_map`) is then
  refused with a message that names the flag. Passing False explicitly also matters:
  left out, transformers asks on stdin whether to run the code.

`field` names the spec field of a user's folder (`pretrain.from`): any failure to load it is
bad input naming that field. Upstream artifacts (field None) were written by gristmill;
a failure there is a stage failure, except remote code refused, which is always bad input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_specs.errors import InputError

# Suffixes of weights saved with pickle (torch.save); safetensors files end in .safetensors.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
REMOTE_CODE_FLAG = "--trust-remote-code"


def check_safetensors(path: Path, field: str | None) -> None:
    """Bad input when `path` holds pickle weights but no safetensors file."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    if any(p.suffix == ".safetensors" for p in files):
        return
    pickles = sorted(p.relative_to(path).as_posix() for p in files if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise InputError(
            f"{field or 'artifact'}: {path} holds pickle weights only ({', '.join(pickles[:3])}); gristmill loads "
            "safetensors only, because loading a pickle can run code. Convert it once, where you trust it: "
            "AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, safe_serialization=True)")


def _remote_code_refused(error: Exception, trust_remote_code: bool) -> bool:
    """True for transformers' refusal to run a folder's own code (a ValueError naming the option)."""
    return not trust_remote_code and isinstance(error, ValueError) and "trust_remote_code" in str(error)


def _failed(error: Exception, path: Path, field: str | None, what: str, trust_remote_code: bool) -> None:
    """Raises the InputError a failed load means, or returns when it is not bad input."""
    if _remote_code_refused(error, trust_remote_code):
        raise InputError(f"{field or 'artifact'}: {path} needs its own Python code (an auto_map in its config), "
                         f"which gristmill runs only when asked: pass {REMOTE_CODE_FLAG} to `gristmill run` (or "
                         "`gristmill eval`) if you trust this folder") from None
    if field is not None:
        raise InputError(f"{field}: {path} is not a {what} ({type(error).__name__}: {error})") from None


def load_causal_lm(path: Path, *, trust_remote_code: bool, field: str | None = None,
                   what: str = "loadable causal LM", **kwargs: Any):
    """An `AutoModelForCausalLM` from a local folder, safetensors only."""
    from transformers import AutoModelForCausalLM

    check_safetensors(path, field)
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True,
                                                    trust_remote_code=trust_remote_code, **kwargs)
    except Exception as e:  # transformers raises many types for a foreign folder
        _failed(e, path, field, what, trust_remote_code)
        raise


def load_tokenizer(path: Path, *, trust_remote_code: bool, field: str | None = None, **kwargs: Any):
    """An `AutoTokenizer` from a local folder (tokenizers hold no pickled weights)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, **kwargs)
    except Exception as e:  # transformers raises many types for a foreign folder
        _failed(e, path, field, "loadable tokenizer", trust_remote_code)
        raise


def load_sentence_transformer(path: Path, *, trust_remote_code: bool, device: str, field: str | None = None):
    """A `SentenceTransformer` from a local folder, its transformer's weights from safetensors only."""
    from sentence_transformers import SentenceTransformer

    check_safetensors(path, field)
    try:
        return SentenceTransformer(str(path), device=device, trust_remote_code=trust_remote_code,
                                   model_kwargs={"use_safetensors": True}, local_files_only=True)
    except Exception as e:  # sentence-transformers raises many types for a foreign folder
        _failed(e, path, field, "sentence-transformers model", trust_remote_code)
        raise


def load_embedder(path: Path, device: str, *, trust_remote_code: bool, field: str | None = None):
    """A local sentence-transformers folder on `device` (safetensors only); a folder that is not one
    is bad input naming `field` (index.embedder)."""
    if not path.is_dir():
        raise InputError(f"{field or 'embedder'}: {path} is not a folder")
    return load_sentence_transformer(path, trust_remote_code=trust_remote_code, field=field, device=device)
