"""`hybridize push HYBRID REPO_ID`: write the model card and loadable code, then upload the folder with huggingface_hub.

Whether the Hub can be reached and a token is there is checked first, in a second, before any work. The folder is
then built in a temporary folder that is removed whatever happens, so a failed upload leaves no model copy behind;
`--dry-run DIR` writes the same folder to DIR and uploads nothing. The token comes from the environment (HF_TOKEN)
or `hf auth login`, never from the command line.
"""

import tempfile
from pathlib import Path

from huggingface_hub import constants as hub_constants

from ..errors import UserError
from ..atomic import OUTPUT_RECORD, check_output_folder, staged_folder
from ..teacher import hub_reachable
from .export import check_loadable, export_folder, parameter_count
from .model_card import render_card


def add_arguments(parser) -> None:
    parser.add_argument("hybrid", help="a hybrid model folder (from hybridize convert or distill)")
    parser.add_argument("repo_id", help="the Hub repository, e.g. my-org/Llama-3.2-1B-hybrid")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="upload to this branch (created if missing; default: main)")
    parser.add_argument("--dry-run", metavar="DIR", default=None,
                        help="write the exact folder that would be uploaded to DIR, and upload nothing")
    parser.add_argument("--overwrite", action="store_true",
                        help="--dry-run: write into a DIR that is not empty, replacing the files push writes "
                             "(other files are kept)")
    parser.add_argument("--message", default=None, help="commit message (default: 'Upload NAME with hybridize push')")


def _check_target(target: Path, hybrid: Path, overwrite: bool) -> None:
    if target.resolve() == hybrid.resolve() or target.resolve() in hybrid.resolve().parents:
        raise UserError(f"{target} holds the hybrid itself; pick another folder")
    check_output_folder(target, overwrite=overwrite)


def _write_folder(hybrid: Path, repo_id: str, folder: Path) -> None:
    exported = export_folder(hybrid, folder)
    card = render_card(repo_id, folder, exported["model"], parameter_count(exported["model"]))
    (folder / "README.md").write_text(card)


def build_folder(hybrid: Path, repo_id: str, target: Path, *, overwrite: bool = False) -> list[str]:
    """Write the whole upload folder to `target`; return its files."""
    check_loadable(hybrid)
    _check_target(target, hybrid, overwrite)
    with staged_folder(target, replace=overwrite) as staging:
        _write_folder(hybrid, repo_id, staging)
    return sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file() and p.name != OUTPUT_RECORD)


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(f"repository id {repo_id!r} is not valid: {str(err).splitlines()[0]}") from None
    if "/" not in repo_id:
        raise UserError(f"repository id {repo_id!r} needs a namespace: USER/NAME or ORG/NAME")


def upload(folder: Path, repo_id: str, *, private: bool, revision: str | None, message: str) -> str:
    """Create the repository (and branch) if needed and upload `folder`; return the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(folder_path=folder, repo_id=repo_id, revision=revision, commit_message=message)
    except Exception as err:  # HTTP, auth and network errors come in many types; all end the same way
        raise UserError(f"upload to {repo_id} failed: {str(err).splitlines()[0]}; nothing was kept "
                        "(--dry-run DIR writes the folder locally)") from err
    return commit.commit_url


def check_hub_ready() -> None:
    """Offline or without a token, say so at once: before minutes of export, and with nothing written."""
    from huggingface_hub import get_token

    local = "nothing written; --dry-run DIR writes the folder locally"
    if hub_constants.HF_HUB_OFFLINE or not hub_reachable():
        raise UserError(f"offline: the Hugging Face Hub cannot be reached; {local}")
    if get_token() is None:
        raise UserError(f"no Hugging Face token: set HF_TOKEN or run `hf auth login`; {local}")


def run(args) -> int:
    _check_repo_id(args.repo_id)
    hybrid = Path(args.hybrid)
    if args.dry_run:
        target = Path(args.dry_run)
        files = build_folder(hybrid, args.repo_id, target, overwrite=args.overwrite)
        print(f"wrote {target} ({len(files)} files: {', '.join(files)}); nothing uploaded (--dry-run)")
        return 0
    check_loadable(hybrid)
    check_hub_ready()
    # A temporary folder (under TMPDIR), removed on success and failure alike: the upload is the only output.
    with tempfile.TemporaryDirectory(prefix="hybridize-push-") as folder:
        _write_folder(hybrid, args.repo_id, Path(folder))
        url = upload(Path(folder), args.repo_id, private=args.private, revision=args.revision,
                     message=args.message or f"Upload {hybrid.name} with hybridize push")
    print(f"uploaded {hybrid} to {url}")
    return 0
