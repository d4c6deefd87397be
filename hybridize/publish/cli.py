"""`hybridize push HYBRID REPO_ID`: write the model card and loadable code, then upload the folder with huggingface_hub.

The folder is built in full first (HYBRID/publish, or the --dry-run folder, which stops there), so an
upload that cannot happen (offline, no token, refused) leaves a complete folder to retry from. The token
comes from the environment (HF_TOKEN) or `hf auth login`, never from the command line.
"""

from pathlib import Path

from huggingface_hub import constants as hub_constants

from ..errors import UserError
from ..atomic import staged_folder
from ..teacher import hub_reachable
from .export import EXPORT_MARKER, check_loadable, export_folder, parameter_count
from .model_card import render_card


def add_arguments(parser) -> None:
    parser.add_argument("hybrid", help="a hybrid model folder (from hybridize convert or distill)")
    parser.add_argument("repo_id", help="the Hub repository, e.g. my-org/Llama-3.2-1B-hybrid")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="upload to this branch (created if missing)")
    parser.add_argument("--dry-run", metavar="DIR", default=None,
                        help="write the exact folder that would be uploaded to DIR, and upload nothing")
    parser.add_argument("--message", default=None, help="commit message")


def _check_target(target: Path, hybrid: Path) -> None:
    """The folder is replaced as a whole: refuse anything but a new or empty folder or an earlier export."""
    if target.resolve() == hybrid.resolve() or target.resolve() in hybrid.resolve().parents:
        raise UserError(f"{target} holds the hybrid itself; pick another folder")
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / EXPORT_MARKER).is_file())):
        raise UserError(f"{target} exists and is not an earlier `hybridize push` folder; pick a new or empty folder")


def build_folder(hybrid: Path, repo_id: str, target: Path) -> list[str]:
    """Write the whole upload folder to `target` (replacing it); return its files."""
    check_loadable(hybrid)
    _check_target(target, hybrid)
    with staged_folder(target) as staging:
        exported = export_folder(hybrid, staging)
        card = render_card(repo_id, staging, exported["model"], parameter_count(exported["model"]))
        (staging / "README.md").write_text(card)
    return sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())


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
    from huggingface_hub import HfApi, get_token

    kept = f"nothing uploaded; the folder is ready at {folder}"
    if hub_constants.HF_HUB_OFFLINE or not hub_reachable():
        raise UserError(f"offline: the Hugging Face Hub cannot be reached; {kept}")
    if get_token() is None:
        raise UserError(f"no Hugging Face token: set HF_TOKEN or run `hf auth login`; {kept}")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(folder_path=folder, repo_id=repo_id, revision=revision, commit_message=message)
    except Exception as err:  # HTTP, auth and network errors come in many types; all end the same way
        raise UserError(f"upload to {repo_id} failed: {str(err).splitlines()[0]}; {kept}") from err
    return commit.commit_url


def run(args) -> int:
    _check_repo_id(args.repo_id)
    hybrid = Path(args.hybrid)
    target = Path(args.dry_run) if args.dry_run else hybrid / "publish"
    files = build_folder(hybrid, args.repo_id, target)
    if args.dry_run:
        print(f"wrote {target} ({len(files)} files: {', '.join(files)}); nothing uploaded (--dry-run)")
        return 0
    url = upload(target, args.repo_id, private=args.private, revision=args.revision,
                 message=args.message or f"Upload {hybrid.name} with hybridize push")
    print(f"uploaded {target} to {url}")
    return 0
