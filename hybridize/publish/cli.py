"""`hybridize push HYBRID REPO_ID`: write the model card and loadable code, then upload the folder with huggingface_hub.

`--dry-run DIR` writes the same folder to DIR and uploads nothing. The work is publish/pipeline.py's `push` and
`publish_to_folder`: the Hub is checked before any work, and a failed upload leaves no model copy behind.
"""

from pathlib import Path

from .pipeline import publish_to_folder, push


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


def run(args) -> int:
    if args.dry_run:
        files = publish_to_folder(args.hybrid, args.repo_id, args.dry_run, overwrite=args.overwrite)
        print(f"wrote {Path(args.dry_run)} ({len(files)} files: {', '.join(files)}); nothing uploaded (--dry-run)")
        return 0
    url = push(args.hybrid, args.repo_id, private=args.private, revision=args.revision, message=args.message)
    print(f"uploaded {Path(args.hybrid)} to {url}")
    return 0
