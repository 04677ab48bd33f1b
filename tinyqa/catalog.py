"""Everything tinyqa finds or downloads by name: the card's checkpoints and the MRQA splits, and where they land.

- `cache_root()`: the one folder tinyqa keeps its downloads and caches in ($TINYQA_CACHE, else
  ~/.cache/tinyqa): the MRQA splits, the feature store, the teacher's logits.
- `ALIASES` and `CARD_FAMILY`: the 17 checkpoints of the TinyRoBERTa-MRQA card's model-family table with
  its macro EM/F1, and deepset's TinyRoBERTa line.
- `resolve_dir(name)`: a local directory as is; an alias or hub id downloaded through `huggingface_hub`
  (only the files needed; its cache and HF_HUB_OFFLINE are honoured).
- `SPLITS` and `split_files(split)`: the MRQA 2019 release's files (Fisch et al. 2019, the shared task's
  README) with their URLs and MD5s, downloaded once, verified, resumed when cut; `split_sources()`: where
  they are fetched from (the release, or a mirror or table that TINYQA_MRQA_MIRROR / TINYQA_MRQA_SPLITS name).
"""
import functools
import http.client
import json
import os
import re
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request

from .errors import TinyQAError, missing
from .files import digest, lock


def cache_root() -> str:
    return os.environ.get("TINYQA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tinyqa")


# --- the card's checkpoints

# Short names for the published checkpoints this project is about: the 17 rows of the TinyRoBERTa-MRQA
# card's model-family table (VMware's hub ids without "VMware/"), then deepset's TinyRoBERTa line.
ALIASES = {
    "bert-tiny-mrqa": "VMware/bert-tiny-mrqa",
    "bert-base-mrqa": "VMware/bert-base-mrqa",
    "bert-large-mrqa": "VMware/bert-large-mrqa",
    "deberta-v3-xsmall-mrqa": "VMware/deberta-v3-xsmall-mrqa",
    "deberta-v3-base-mrqa": "VMware/deberta-v3-base-mrqa",
    "deberta-v3-large-mrqa": "VMware/deberta-v3-large-mrqa",
    "electra-small-mrqa": "VMware/electra-small-mrqa",
    "electra-base-mrqa": "VMware/electra-base-mrqa",
    "electra-large-mrqa": "VMware/electra-large-mrqa",
    "minilmv2-l6-h384-from-bert-large-mrqa": "VMware/minilmv2-l6-h384-from-bert-large-mrqa",
    "minilmv2-l6-h768-from-bert-large-mrqa": "VMware/minilmv2-l6-h768-from-bert-large-mrqa",
    "minilmv2-l6-h384-from-roberta-large-mrqa": "VMware/minilmv2-l6-h384-from-roberta-large-mrqa",
    "minilmv2-l12-h384-from-roberta-large-mrqa": "VMware/minilmv2-l12-h384-from-roberta-large-mrqa",
    "minilmv2-l6-h768-from-roberta-large-mrqa": "VMware/minilmv2-l6-h768-from-roberta-large-mrqa",
    "roberta-base-mrqa": "VMware/roberta-base-mrqa",
    "roberta-large-mrqa": "VMware/roberta-large-mrqa",
    "tinyroberta-mrqa": "VMware/tinyroberta-mrqa",
    "tinyroberta-squad2": "deepset/tinyroberta-squad2",
    "tinyroberta-squad2-step1": "deepset/tinyroberta-squad2-step1",
    "roberta-base-squad2": "deepset/roberta-base-squad2",
    "roberta-large-squad2": "deepset/roberta-large-squad2",
    "tinyroberta-6l-768d": "deepset/tinyroberta-6l-768d",  # general-distilled; where step1 started
}

# The card's model-family table: (row, alias, eval EM, eval F1, test EM, test F1); macro averages over
# MRQA's in-domain ("eval") and out-of-domain ("test") dev sets. evaluate.py --help and the README print it.
CARD_FAMILY = [
    ("BERT-Tiny", "bert-tiny-mrqa", 22.78, 32.42, 10.18, 18.72),
    ("BERT-Base", "bert-base-mrqa", 64.48, 76.14, 48.89, 59.89),
    ("BERT-Large", "bert-large-mrqa", 69.52, 80.50, 55.00, 65.78),
    ("DeBERTa-v3-Extra-Small", "deberta-v3-xsmall-mrqa", 65.58, 77.17, 50.92, 62.58),
    ("DeBERTa-v3-Base", "deberta-v3-base-mrqa", 71.43, 82.59, 59.49, 70.46),
    ("DeBERTa-v3-Large", "deberta-v3-large-mrqa", 76.08, 86.23, 64.27, 75.22),
    ("ELECTRA-Small", "electra-small-mrqa", 57.63, 69.38, 38.68, 51.56),
    ("ELECTRA-Base", "electra-base-mrqa", 68.78, 80.16, 54.70, 65.80),
    ("ELECTRA-Large-Discriminator", "electra-large-mrqa", 74.15, 84.96, 62.35, 73.28),
    ("MiniLMv2-L6-H384-from-BERT-Large", "minilmv2-l6-h384-from-bert-large-mrqa", 59.31, 71.09, 41.78, 53.30),
    ("MiniLMv2-L6-H768-from-BERT-Large", "minilmv2-l6-h768-from-bert-large-mrqa", 64.27, 75.84, 49.05, 59.82),
    ("MiniLMv2-L6-H384-from-RoBERTa-Large", "minilmv2-l6-h384-from-roberta-large-mrqa", 59.27, 70.64, 42.95, 54.03),
    ("MiniLMv2-L12-H384-from-RoBERTa-Large", "minilmv2-l12-h384-from-roberta-large-mrqa", 64.58, 76.23, 51.28, 62.83),
    ("MiniLMv2-L6-H768-from-RoBERTa-Large", "minilmv2-l6-h768-from-roberta-large-mrqa", 65.80, 77.17, 51.72, 63.27),
    ("RoBERTa-Base", "roberta-base-mrqa", 69.06, 80.08, 55.53, 66.49),
    ("RoBERTa-Large", "roberta-large-mrqa", 74.08, 84.38, 62.20, 72.88),
    ("TinyRoBERTa", "tinyroberta-mrqa", 69.38, 80.07, 53.29, 64.16),
]

# The same numbers keyed by hub id, as evaluate.py looks them up: "dev" is the card's "Eval" (the six
# in-domain MRQA dev sets), "test" its "Test" (the six out-of-domain ones).
CARD_SCORES = {f"VMware/{alias}": {"dev": (a, b), "test": (c, d)} for _, alias, a, b, c, d in CARD_FAMILY}


def card_table() -> str:
    """The card's family table as aligned text (evaluate.py --help)."""
    lines = [f"{'row':<38}{'alias (VMware/<alias> on the hub)':<44}{'eval EM':>8}{'F1':>7}{'test EM':>9}{'F1':>7}"]
    lines += [f"{row:<38}{alias:<44}{a:>8.2f}{b:>7.2f}{c:>9.2f}{d:>7.2f}" for row, alias, a, b, c, d in CARD_FAMILY]
    return "\n".join(lines)


# --- checkpoints from the Hugging Face Hub

LOCAL_HINT = ("pass a local directory holding config.json and model.safetensors (or pytorch_model.bin) and the "
              "tokenizer files instead")
OFFLINE_HINT = LOCAL_HINT + "; set HF_HUB_OFFLINE=1 to use only the HF cache without trying the network"


@functools.lru_cache(maxsize=None)
def _hub_unreachable():
    """Why the Hugging Face Hub cannot be reached, or None. One TCP connect with a 3 s timeout, once per
    process: offline, huggingface_hub would otherwise retry each file for half a minute before failing.
    Behind a proxy a direct connect proves nothing, so there we let huggingface_hub try."""
    from huggingface_hub import constants
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError as e:
        return f"cannot reach {url.hostname}: {e.strerror or e}"
    return None


def _hub_download(repo_id: str, filename: str, optional=False, flag=None, revision=None):
    """The local path of one file of a hub repo (at `revision`, else main), from the HF cache or downloaded
    into it; None for an optional file the repo lacks (or, offline, the cache lacks)."""
    from huggingface_hub import constants, hf_hub_download
    offline = constants.HF_HUB_OFFLINE or _hub_unreachable()
    try:
        # Offline, only the HF cache is looked at (no retries); online, huggingface_hub also checks for updates.
        return hf_hub_download(repo_id, filename, revision=revision, local_files_only=bool(offline))
    except Exception as e:  # what went wrong, as one line that says what to do
        if optional and _is_missing(e, offline):
            return None
        raise _hub_error(e, repo_id, filename, offline, f"{flag} {repo_id}" if flag else repr(repo_id)) from None


def _is_missing(e, offline) -> bool:
    """The repo has no such file, or (offline) the cache has none: an optional file is then just absent."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    return isinstance(e, EntryNotFoundError) and (offline or not isinstance(e, LocalEntryNotFoundError))


def _hub_error(e, repo_id, filename, offline, name) -> TinyQAError:
    """One line for a failed hf_hub_download, by what the Hub (or its absence) said."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)
    if isinstance(e, LocalEntryNotFoundError) and isinstance(e.__cause__, HfHubHTTPError):
        e = e.__cause__  # the Hub answered, with an error that huggingface_hub retried (5xx) before giving up
    status = e.response.status_code if isinstance(e, HfHubHTTPError) and e.response is not None else None
    page, login = f"{constants.ENDPOINT}/{repo_id}", "log in (`hf auth login`, or set HF_TOKEN)"
    if isinstance(e, LocalEntryNotFoundError) and constants.HF_HUB_OFFLINE:  # the user said: the cache only
        return TinyQAError(f"{name}: {filename} is not in the HF cache, and HF_HUB_OFFLINE=1 forbids downloading it: "
                           f"run once with a network and without HF_HUB_OFFLINE, or {LOCAL_HINT}")
    if isinstance(e, LocalEntryNotFoundError):  # no network, and not in the HF cache
        why = offline or "no connection to the Hugging Face Hub"
        return TinyQAError(f"{name}: {filename} is not in the HF cache and cannot be downloaded ({why}); "
                           + OFFLINE_HINT)
    if isinstance(e, EntryNotFoundError):
        return TinyQAError(f"{name}: the repository on the Hugging Face Hub has no {filename}")
    if isinstance(e, GatedRepoError) or (status in (401, 403) and not isinstance(e, RepositoryNotFoundError)):
        return TinyQAError(f"{name} is gated or private on the Hugging Face Hub ({status}): ask for access at {page}, "
                           f"then {login} with that account; or {LOCAL_HINT}")
    if isinstance(e, RepositoryNotFoundError):
        known = "" if repo_id in ALIASES.values() else f"; known aliases: {', '.join(ALIASES)}"
        return TinyQAError(f"{name} is not a model on the Hugging Face Hub at {page}: check the name (and HF_ENDPOINT, "
                           f"if set), or if the model is private, {login} with an account that can read it{known}")
    if status is not None and status >= 500:
        return TinyQAError(f"{name}: the Hugging Face Hub answered {status} for {filename}, also to huggingface_hub's "
                           f"retries: it is having trouble; run again later, or {LOCAL_HINT}")
    reason = (str(e).strip().splitlines() or [""])[0][:200]  # connection refused, timeouts, other HTTP errors
    return TinyQAError(f"{name}: could not download {filename} from the Hugging Face Hub "
                       f"({type(e).__name__}: {reason}); {OFFLINE_HINT}")


def quiet_downloads():
    """No progress bars from huggingface_hub's downloads, for the rest of the process: what the scripts'
    --quiet means for them (tinyqa's own downloads take `progress`)."""
    from huggingface_hub.utils import disable_progress_bars
    disable_progress_bars()


def looks_like_path(name: str) -> bool:
    """`./x`, `/abs`, `~/x`, `a/b/c`, `x/`, or `runs/distill` when `runs/` exists here: a local folder was
    meant, so a missing one is "no such directory", never a hub lookup. (`owner/name` alone is a hub id.)"""
    if name.startswith((".", "/", "~")) or name.endswith(("/", os.sep)) or "\\" in name or name.count("/") > 1:
        return True
    return "/" in name and os.path.isdir(name.split("/")[0])


def resolve_dir(name_or_path: str, model=True, tokenizer=True, flag=None) -> str:
    """Return a local directory holding the checkpoint's files, downloading only what is asked for.
    `flag` (e.g. "--teacher") names the command-line flag in error messages."""
    what = f"{flag} {name_or_path}" if flag else name_or_path
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        raise TinyQAError(f"{what}: is a file; give the checkpoint's directory (config.json, model.safetensors)")
    if looks_like_path(name_or_path) or os.path.islink(name_or_path):
        raise TinyQAError(f"{what}: {missing(name_or_path, 'no such directory')}")
    repo_id = ALIASES.get(name_or_path, name_or_path)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        head = f"{flag} {name_or_path}: unknown model" if flag else f"unknown model {name_or_path!r}"
        raise TinyQAError(f"{head}: not a local directory, not an alias "
                          f"({', '.join(ALIASES)}) and not a hub id like VMware/tinyroberta-mrqa")
    try:
        return _download_checkpoint(repo_id, model, tokenizer, flag)
    except TinyQAError as e:
        if name_or_path in ALIASES:
            raise
        raise TinyQAError(f"{e} (and there is no local directory {name_or_path})") from None


def _download_checkpoint(repo_id, model, tokenizer, flag):
    """The snapshot folder holding the files asked for. All come from one commit, the first file's (its
    snapshot folder is named by it): a push to the repo between two files cannot split them over two folders."""
    revision = None

    def get(filename, optional=False):
        nonlocal revision
        path = _hub_download(repo_id, filename, optional, flag, revision)
        commit = os.path.basename(os.path.dirname(path or ""))  # .../snapshots/<commit>/<filename>
        if revision is None and re.fullmatch(r"[0-9a-f]{40}", commit):
            revision = commit
        return path

    path = None
    if model:
        path = get("config.json")
        get("model.safetensors", optional=True) or get("pytorch_model.bin")
    if tokenizer:  # tokenizer.json, else BERT's vocab.txt, else RoBERTa's vocab.json + merges.txt
        # (deepset/roberta-base-squad2 ships only vocab.json + merges.txt); tokenizer_config.json says
        # whether a vocab.txt is cased.
        get("tokenizer_config.json", optional=True)
        path = get("tokenizer.json", optional=True) or get("vocab.txt", optional=True)
        if not path:
            get("vocab.json")
            path = get("merges.txt")
    return os.path.dirname(path)


# --- the MRQA 2019 splits

_S3 = "https://s3.us-east-2.amazonaws.com/mrqa/release/v2"
# (split, dataset) -> (url, md5 of the .jsonl.gz, questions). From the MRQA 2019 release README.
SPLITS = {
    ("train", "SQuAD"): (f"{_S3}/train/SQuAD.jsonl.gz", "efd6a551d2697c20a694e933210489f8", 86588),
    ("train", "NewsQA"): (f"{_S3}/train/NewsQA.jsonl.gz", "182f4e977b849cb1dbfb796030b91444", 74160),
    ("train", "TriviaQA"): (f"{_S3}/train/TriviaQA-web.jsonl.gz", "e18f586152612a9358c22f5536bfd32a", 61688),
    ("train", "SearchQA"): (f"{_S3}/train/SearchQA.jsonl.gz", "612245315e6e7c4d8446e5fcc3dc1086", 117384),
    ("train", "HotpotQA"): (f"{_S3}/train/HotpotQA.jsonl.gz", "d212c7b3fc949bd0dc47d124e8c34907", 72928),
    ("train", "NaturalQuestions"): (f"{_S3}/train/NaturalQuestionsShort.jsonl.gz",
                                    "e27d27bf7c49eb5ead43cef3f41de6be", 104071),
    ("dev", "SQuAD"): (f"{_S3}/dev/SQuAD.jsonl.gz", "05f3f16c5c31ba8e46ff5fa80647ac46", 10507),
    ("dev", "NewsQA"): (f"{_S3}/dev/NewsQA.jsonl.gz", "5c188c92a84ddffe2ab590ac7598bde2", 4212),
    ("dev", "TriviaQA"): (f"{_S3}/dev/TriviaQA-web.jsonl.gz", "5c9fdc633dfe196f1b428c81205fd82f", 7785),
    ("dev", "SearchQA"): (f"{_S3}/dev/SearchQA.jsonl.gz", "9217ad3f6925c384702f2a4e6d520c38", 16980),
    ("dev", "HotpotQA"): (f"{_S3}/dev/HotpotQA.jsonl.gz", "125a96846c830381a8acff110ff6bd84", 5904),
    ("dev", "NaturalQuestions"): (f"{_S3}/dev/NaturalQuestionsShort.jsonl.gz",
                                  "c0347eebbca02d10d1b07b9a64efe61d", 12836),
    # out-of-domain dev: the model card's "Test"
    ("test", "BioASQ"): ("http://participants-area.bioasq.org/MRQA2019/", "70752a39beb826a022ab21353cb66e54", 1504),
    ("test", "DROP"): (f"{_S3}/dev/DROP.jsonl.gz", "070eb2ac92d2b2fc1b99abeda97ac37a", 1503),
    ("test", "DuoRC"): (f"{_S3}/dev/DuoRC.ParaphraseRC.jsonl.gz", "b325c0ad2fa10e699136561ee70c5ddd", 1501),
    ("test", "RACE"): (f"{_S3}/dev/RACE.jsonl.gz", "ba8063647955bbb3ba63e9b17d82e815", 674),
    ("test", "RelationExtraction"): (f"{_S3}/dev/RelationExtraction.jsonl.gz",
                                     "266be75954fcb31b9dbfa9be7a61f088", 2948),
    ("test", "TextbookQA"): (f"{_S3}/dev/TextbookQA.jsonl.gz", "8b52d21381d841f8985839ec41a6c7f7", 1503),
}
# BioASQ is served from a registration page, not as a file: it must be downloaded by hand.
REGISTRATION_PAGES = {SPLITS[("test", "BioASQ")][0]}

# Where split_files fetches from: the release's URLs above, unless the environment names another copy --
#   TINYQA_MRQA_MIRROR=URL   a copy of the release's folders (URL/train/SQuAD.jsonl.gz, URL/dev/DROP.jsonl.gz,
#                            ...; https://, http:// or file://), checked against the release's MD5s;
#   TINYQA_MRQA_SPLITS=FILE  a JSON table that replaces SPLITS: {"train": {"SQuAD": {"url": URL, "md5": MD5},
#                            ...}, "dev": {...}, "test": {...}}, for files that are not the release's (a subset, a
#                            repaired copy); a split it leaves out cannot be downloaded.
SPLIT_NAMES = ("train", "dev", "test")


def split_sources() -> dict:
    """(split, dataset) -> (url, md5) of every file split_files may fetch: SPLITS, else the copy that
    TINYQA_MRQA_SPLITS or TINYQA_MRQA_MIRROR names (above)."""
    if os.environ.get("TINYQA_MRQA_SPLITS"):
        return _read_split_table(os.environ["TINYQA_MRQA_SPLITS"])
    mirror = os.environ.get("TINYQA_MRQA_MIRROR", "").rstrip("/")
    return {key: (mirror + url[len(_S3):] if mirror and url.startswith(_S3) else url, md5)
            for key, (url, md5, _) in SPLITS.items()}


def _read_split_table(path) -> dict:
    where = f"TINYQA_MRQA_SPLITS={path}"
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
        sources = {(split, name): (entry["url"], entry["md5"])
                   for split, files in table.items() for name, entry in files.items()}
    except OSError as e:
        raise TinyQAError(f"{where}: cannot read it ({e.strerror or e})")
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # bad JSON, a missing "url" or "md5"
        raise TinyQAError(f"{where}: not a table {{split: {{dataset: {{\"url\": URL, \"md5\": MD5}}}}}} "
                          f"({type(e).__name__}: {e})")
    for (split, name), (url, md5) in sources.items():
        if split not in SPLIT_NAMES or not re.fullmatch(r"[\w.-]+", name) or not isinstance(url, str) \
                or not re.fullmatch(r"[0-9a-f]{32}", str(md5)):
            raise TinyQAError(f"{where}: {split}/{name}: the splits are {', '.join(SPLIT_NAMES)}, a dataset's name "
                              "is letters, digits, '.', '-' or '_', and each has a URL and an MD5 of 32 hex digits")
    return sources


def split_files(split: str, datasets=None, progress=True, flag="--data") -> list:
    """Local paths of an official split ('train', 'dev' = in-domain dev, 'test' = out-of-domain dev); `flag`
    is the option that takes local files instead (evaluate.py's --data, the training scripts' --train)."""
    if split not in SPLIT_NAMES:
        raise TinyQAError(f"unknown split {split!r}: use train, dev (in-domain dev) or test (out-of-domain dev)")
    sources = {name: src for (s, name), src in split_sources().items()
               if s == split and (not datasets or name in datasets)}
    if not sources:
        raise TinyQAError(f"TINYQA_MRQA_SPLITS={os.environ.get('TINYQA_MRQA_SPLITS')} lists no {split} files: add "
                          f"them to it, or pass them with {flag} FILE")
    paths = []
    for name, (url, md5) in sources.items():
        dest = os.path.join(cache_root(), "mrqa", split, f"{name}.jsonl.gz")
        if url in REGISTRATION_PAGES:
            paths.append(_by_hand(name, url, md5, dest, flag))
        else:
            paths.append(download(url, md5, dest, progress, flag))
    return paths


def _by_hand(name, url, md5, dest, flag) -> str:
    """A file the user downloads from a registration page and puts in the cache: checked, never fetched."""
    if not os.path.exists(dest):
        raise TinyQAError(f"{name} is served from a registration page ({url}), not as a file: download "
                          f"its MRQA dev file there and put it at {dest}, or pass it with {flag} FILE")
    got = _md5(dest)
    if got != md5:
        raise TinyQAError(f"{dest}: MD5 {got} is not the release's {md5}: this is not the MRQA "
                          f"{name} dev file (or it is damaged); download it again from {url}")
    return dest


# --- verified, resumable downloads

def _md5(path) -> str:
    return digest(path, "md5")


def _size(path) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def download(url: str, md5: str, dest: str, progress=True, flag="--data") -> str:
    """Fetch url to dest unless a verified copy is there; return dest.

    The bytes land in dest.part, and dest appears (one rename) only once their MD5 matches: an interrupted,
    cut or corrupted download never leaves a file that passes for complete. What dest.part holds is kept
    when a download stops halfway (a dropped connection, Ctrl-C, a killed run), and the next try asks only
    for the rest with an HTTP Range request; a server that ignores Range sends the whole file, which starts
    dest.part over. Kept bytes that then fail the MD5 (the file changed on the server) are fetched once
    more from the start. One process at a time downloads a file (dest.lock): torchrun's ranks, or two runs,
    wait for the first and then find its verified copy."""
    if os.path.exists(dest) and _md5(dest) == md5:
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    part = dest + ".part"
    with lock(dest + ".lock", lambda line: print(line, file=sys.stderr), f"a download of {os.path.basename(dest)}"):
        if os.path.exists(dest) and _md5(dest) == md5:  # the process this one waited for downloaded it
            return dest
        resumed = _size(part) > 0
        _fetch(url, part, progress, flag)
        if resumed and _md5(part) != md5:
            os.remove(part)
            _fetch(url, part, progress, flag)
        got = _md5(part)
        if got != md5:
            os.remove(part)
            raise TinyQAError(f"{url}: MD5 {got} is not the expected {md5}; the download was deleted: run again "
                              "(if it persists, the server's copy is damaged, or is not the file that MD5 names)")
        os.replace(part, dest)
    return dest


def _fetch(url, part, progress, flag):
    """Bring part up to the whole of url's file, resuming after every dropped connection that brought bytes.
    A try that brings none ends it: one line, part kept (if it holds bytes) for the next run to resume."""
    while True:
        before = _size(part)
        try:
            return _get(url, part, progress)
        except (OSError, http.client.HTTPException, ValueError) as e:  # refused, timed out, cut, HTTP errors
            if _size(part) > before:
                continue  # the connection dropped after some bytes: ask for the rest
            kept = _size(part)
            if not kept and os.path.exists(part):
                os.remove(part)
            resume = f"the {kept} bytes fetched so far stay in {part} for the next run to resume; " if kept else ""
            raise TinyQAError(f"could not download {url} ({e}); {resume}if you are offline, download it elsewhere "
                              f"and pass it with {flag} FILE") from None


def _get(url, part, progress):
    """One request for what part lacks of url's file: all of it, or the rest (a Range request) when part
    holds bytes. A response that ends before its Content-Length is an error (http.client's read() just
    returns b"" when the connection drops), with the bytes that came kept in part."""
    from tqdm import tqdm
    have = _size(part)
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=30)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # no bytes after `have`: part is whole, or longer (not this file): the MD5 says
            return
        raise
    with response:
        if have and not (response.status == 206 and
                         response.headers.get("Content-Range", "").startswith(f"bytes {have}-")):
            have = 0  # the whole file came (the server ignores Range, or file://): part starts over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        with open(part, "ab" if have else "wb") as out, \
                tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=os.path.basename(part)[:-len(".part")],
                     disable=not progress) as bar:
            for block in iter(lambda: response.read1(1 << 20), b""):  # what has come, as it comes
                out.write(block)
                out.flush()  # on disk now: a run killed next keeps it for the next run to resume from
                bar.update(len(block))
            if total is not None and out.tell() < total:
                raise ConnectionError(f"the connection dropped after {out.tell()} of {total} bytes")
