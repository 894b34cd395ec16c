"""The `diffpriv` command: protect photos and recover them through ComfyUI's HTTP API.

    diffpriv protect group.jpg --task anonymize --out out/
    diffpriv protect photos/ --task hide --out out/ --passphrase-env DP_PASS     (a folder: its pictures)
    diffpriv recover out/group/group_face2_00001.dpkey.safetensors --photo out/group/group_anonymize_faces_00001_.png --out recovered/
    diffpriv protect face.png --task anonymize --whole-image --out out/
    diffpriv recover out/face/face_00001.dpkey.safetensors --out recovered/
    diffpriv protect photos/ --task anonymize --out out/ --ray auto --ray-gpus-per-actor 1
    diffpriv keygen me.identity --passphrase-env ID_PASS    (prints a recipient for --recipient)
    diffpriv report --out out/                                                 (summary.json from the run record)

A rerun with the same --out skips the photos already done from the same bytes with the
same settings, and does the rest; its exit status (0, 1 if one of its photos failed, 2 for
a usage error) speaks of its own photos only.

With ``--server URL`` (repeatable) it uses running ComfyUI servers; with ``--ray`` it
spreads the batch over a Ray cluster, one embedded ComfyUI per actor (cluster.py);
without either, it starts the embedded ComfyUI headless for the run. It never imports
ComfyUI itself.
"""
from __future__ import annotations

import argparse
import contextlib
import getpass
import hashlib
import os
import signal
import sys
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Iterator

from diffpriv_core import key_crypto
from diffpriv_core.key_format import KEY_SUFFIX, KeyFileError
from diffpriv_core.tasks import TASKS

from . import demo, graphs, photo_batches
from .batch import Cleanup, Job, JobSession, in_prompts, run_batch, upload_photo
from .embedded import EmbeddedComfy, prepare_base_directory
from .preflight import (PICTURE_SUFFIXES, Inputs, PreflightError, check_models, check_passphrase, collect_inputs,
                        model_fingerprints, photo_problem, refused_keys, refused_photos)
from .servers import PROMPT_TIMEOUT_S, Server
from .summary import PAGE_PHOTOS, Summary, canonical, latest_run, write_contact_sheet
from .verify import check_protected

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffpriv"

class UsageError(RuntimeError):
    pass


@dataclass(frozen=True)
class KeySecrets:
    """What seals and opens the keys, on this machine: never sent to a ComfyUI server.

    protect: the server seals each key to ``recipient`` (--recipient, or with a passphrase
    this run's own ``identity``, whose keys the command seals anew under ``passphrase``);
    recover: each key is opened here with ``passphrase`` or ``identity``."""

    passphrase: str = ""
    identity: str = ""  # an age identity, AGE-SECRET-KEY-1...
    recipient: str = ""

    def identities(self) -> list | None:
        from pyrage import x25519

        return [x25519.Identity.from_str(self.identity)] if self.identity else None

    def for_servers(self) -> "KeySecrets":
        """What a machine running the servers may hold (a Ray actor): the recipient only."""
        return replace(self, passphrase="", identity="")

    def seal(self, data: bytes) -> bytes:
        """A key the server sealed to this run's recipient, sealed under the passphrase."""
        if not self.passphrase:
            return data
        return key_crypto.resealed_with_passphrase(data, self.identities(), self.passphrase)

    def opened(self, data: bytes) -> bytes:
        """A key file as the unencrypted key it holds, opened here."""
        return key_crypto.decrypted_file(data, self.passphrase or None, self.identities())


@dataclass
class Connection:
    servers: list[Server]
    # The embedded server's models folder; None for servers we did not start.
    embedded_models: Path | None = None


# --- command line --------------------------------------------------------------------
PROTECT_EXAMPLES = """examples:
  diffpriv protect group.jpg --task anonymize --out out/
      every face of the photo: out/group/group_anonymize_faces_00001_.png ..., one key per face
  diffpriv protect photos/ --task hide --out out/ --passphrase-env DP_PASS
      every picture in photos/ (sub-folders too), keys encrypted with the passphrase in $DP_PASS
  diffpriv protect face.png --task anonymize --whole-image --out out/
  diffpriv protect photo.jpg --task anonymize --out demo/ --demo-weights
      random-weight models: checks the installation (meaningless pictures)
  diffpriv protect photos/ --task anonymize --out out/ --ray auto --ray-gpus-per-actor 1

Rerun the same command to finish an interrupted batch: a photo made earlier from the same
bytes with the same settings is skipped; out/summary.json and out/record.sqlite say what
each run did (diffpriv report --out out/).
"""
RECOVER_EXAMPLES = """examples:
  diffpriv recover out/group/group_face2_00001.dpkey.safetensors --photo out/group/group_anonymize_faces_00001_.png \\
      --out recovered/ --passphrase-env DP_PASS          face 2 back into the protected photo
  diffpriv recover out/face/face_00001.dpkey.safetensors --out recovered/     a --whole-image key
  diffpriv recover out/ --out recovered/                every key file under out/

An encrypted key's passphrase is checked here before any server starts.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffpriv", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    protect = sub.add_parser("protect", help="anonymize or hide the faces in photos; writes the pictures and keys",
                             formatter_class=argparse.RawDescriptionHelpFormatter, epilog=PROTECT_EXAMPLES)
    protect.add_argument("images", nargs="+", type=Path, metavar="IMAGE",
                         help="photos to protect, or folders: every picture inside (.png, .jpg, .jpeg, .webp, .bmp, "
                              ".tif, .tiff; sub-folders too); photos may also follow the options")
    protect.add_argument("--task", choices=list(TASKS), required=True,
                         help="; ".join(f"{t.name}: S_ns {t.strength}, tau {t.tau}, {t.steps} steps, {t.samples} "
                                        f"sample{'s' * (t.samples > 1)}" for t in TASKS.values()))
    protect.add_argument("--seed", type=int, help="seed for every seed input of the workflow (default: the workflow's)")
    protect.add_argument("--steps", type=int, help="steps for every steps input of the workflow")
    mode = protect.add_mutually_exclusive_group()
    mode.add_argument("--every-face", dest="whole_image", action="store_false",
                      help="the default: protect every face of each photo, one key per face, the rest of the photo "
                           "untouched (workflow: example_workflows/api/<task>_faces.json)")
    mode.add_argument("--whole-image", dest="whole_image", action="store_true",
                      help="protect the whole picture as one face, for photos that are already one aligned face "
                           "(as in the paper's datasets); any size up to 2048 px (workflow: example_workflows/api/<task>.json)")
    protect.add_argument("--target-similarity", action="store_true",
                         help="guide every face to a target identity distance instead of the paper's fixed lambda: "
                              "the guiding recogniser's cosine to the original ends below its threshold minus "
                              "--margin (anonymize) or above threshold plus --margin (hide); summary.json says "
                              "what each face reached")
    protect.add_argument("--margin", type=float, metavar="COSINE",
                         help="with --target-similarity: distance from the recogniser's threshold, 0 to 1 "
                              "(default: the workflow's, 0.05 in the shipped ones)")
    protect.add_argument("--min-face-size", type=int, metavar="PX",
                         help="every-face workflows: find faces whose box's longer side is at least PX pixels, 12 "
                              "or more (default: the workflow's, 12 in the shipped ones)")
    protect.add_argument("--min-face-score", type=float, metavar="SCORE",
                         help="every-face workflows: protect faces the detector scores at least SCORE, 0 to 1; "
                              "lower-scored candidates are reported as possible faces (default: the workflow's, "
                              "0.7 in the shipped ones; with --detector centerface, 0.3)")
    protect.add_argument("--detector", choices=list(graphs.DETECTOR_MIN_SCORE),
                         help="every-face workflows: the face detector (default: the workflow's, mtcnn in the "
                              "shipped ones; BENCHMARKS.md compares them)")
    protect.add_argument("--strict", action="store_true",
                         help="fail a photo in which Face Detect reports any possible face it did not protect (a "
                              "candidate scoring under its threshold, or one its size or selection settings left out)")
    protect.add_argument("--no-guidance", action="store_true",
                         help="the paper's ablation without energy guidance (Table 5): DDIM with the scheduled key-E "
                              "only, so faces are not steered away from (or kept at) their identity; for measuring, "
                              "not for publishing. summary.json records it and `diffpriv eval` labels it")
    protect.add_argument("--one-embedding", action="store_true",
                         help="the paper's ablation Ours-OE (Table 6): MSI learns one conditioning, from the last CLIP "
                              "layer without time modulation, for every stage; recorded and labelled as --no-guidance")
    protect.add_argument("--photos-per-prompt", type=int, metavar="N",
                         help="every-face workflows: put the faces of up to N photos (at most "
                              f"{photo_batches.MAX_PHOTOS_PER_PROMPT}) in one prompt, so MSI, the sampler and key-I "
                              "make one network call a step for all of them; each photo's results, keys and summary "
                              "entry stay its own (default: "
                              f"{photo_batches.GPU_PHOTOS_PER_PROMPT} when a server computes on a GPU, else 1)")
    protect.set_defaults(func=protect_command, whole_image=False)

    recover = sub.add_parser("recover", help="recover the original pictures from key files",
                             formatter_class=argparse.RawDescriptionHelpFormatter, epilog=RECOVER_EXAMPLES)
    recover.add_argument("keys", nargs="+", type=Path, metavar="KEY",
                         help="key files (*.dpkey.safetensors) that protect wrote, or folders: every key file inside "
                              "(sub-folders too, so protect's --out folder recovers all of its faces)")
    recover.add_argument("--photo", type=Path,
                         help="per-face keys (protect's default): the protected photo to put each recovered face "
                              "back into (default workflow: example_workflows/api/recover_face.json); one output per key")
    recover.add_argument("--identity", type=Path, metavar="FILE",
                         help="the identity file (diffpriv keygen) that opens keys sealed to its recipient; "
                              "--passphrase-env then names the identity file's passphrase")
    recover.set_defaults(func=recover_command)
    protect.add_argument("--recipient", metavar="AGE1...",
                         help="seal every key file to this age recipient (diffpriv keygen prints one): the server "
                              "writes keys it cannot open, and only the identity file opens them")

    keygen = sub.add_parser("keygen", help="make an identity file and print its recipient, for --recipient")
    keygen.add_argument("identity", type=Path, metavar="FILE", help="the new identity file (never replaced)")
    keygen.add_argument("--passphrase-env", metavar="VAR",
                        help="name of the environment variable holding the identity file's passphrase (default: "
                             "asked on the terminal)")
    keygen.set_defaults(func=keygen_command)

    sub.add_parser("eval", add_help=False,
                   help="measure protection and recovery with the paper's metrics (diffpriv eval --help)")

    report_parser = sub.add_parser("report", help="write summary.json and the contact sheets of an --out folder "
                                                  "from its run record, and print its report (no server)")
    report_parser.add_argument("--out", type=Path, required=True, help="the --out folder of a protect or recover run")
    report_parser.set_defaults(func=report_command)

    for p in (protect, recover):
        p.add_argument("--out", type=Path, required=True, help="output folder (DIR/<name>/, DIR/summary.json)")
        p.add_argument("--server", action="append", default=[], metavar="URL",
                       help="a running ComfyUI with the pack; repeat to spread the batch over several")
        p.add_argument("--trust-server", action="append", default=[], metavar="URL",
                       help="like --server, for a server you trust with opened keys: recover sends each key, "
                            "opened on this machine, only to the embedded ComfyUI or to such a server")
        p.add_argument("--prompt-timeout", type=float, default=PROMPT_TIMEOUT_S, metavar="SECONDS",
                       help=f"give up on a photo whose prompt has not finished this long after it was queued "
                            f"(default {PROMPT_TIMEOUT_S:.0f})")
        p.add_argument("--passphrase-env", metavar="VAR",
                       help="name of the environment variable holding the key passphrase (never on the command line)")
        p.add_argument("--workflow", type=Path, help="API-format workflow (default: example_workflows/api/" + (
            "<task>_faces.json, <task>.json with --whole-image)" if p is protect
            else "recover.json, recover_face.json with --photo)"))
        p.add_argument("--base", type=Path,
                       help=f"base directory of the embedded ComfyUI (default: {CACHE_DIR / 'comfy'}, "
                            "or comfy-demo next to it with --demo-weights; with --ray: the folder, on each node, "
                            "that holds each actor's own, removed when it stops; default: the temporary folder)")
        p.add_argument("--models", type=Path, help="models folder for the embedded ComfyUI (linked in; with --ray: "
                                                   f"the same path on every node, default {CACHE_DIR / 'comfy' / 'models'})")
        p.add_argument("--demo-weights", action="store_true",
                       help="generate random-weight test models and run with them: meaningless pictures")
        p.add_argument("--max-in-flight", type=int, default=8, metavar="N",
                       help="prompts queued at once per server (default: 8)")
        p.add_argument("--keep-on-server", action="store_true",
                       help="keep what the command uploaded and what the prompts wrote on the server (by default "
                            "they are removed after downloading, with the prompt history)")
        p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                       help="spread the batch over a Ray cluster, one embedded ComfyUI per actor: ADDRESS of the "
                            "cluster (auto, HOST:PORT, ray://HOST:10001); alone, a cluster started on this machine "
                            "with `ray start`, else a local one (docs/cluster.md)")
        p.add_argument("--ray-actors", type=int, metavar="N",
                       help="with --ray: actors (ComfyUI servers) to ask for (default: as many as the cluster has "
                            "room for now, at least one); the batch starts with those that are up and takes the "
                            "others as the cluster makes room (an autoscaler adds nodes for them)")
        p.add_argument("--ray-gpus-per-actor", type=float, metavar="G",
                       help="with --ray: GPUs each actor asks for, fractions allowed (0.5: two actors share a GPU; "
                            "default: 1 when the cluster has GPUs, else 0). Asked for even when no GPU node is up "
                            "yet, so an autoscaler adds one")
        p.add_argument("--ray-cpus-per-actor", type=float, default=1.0, metavar="C",
                       help="with --ray: CPUs each actor asks for (default: 1)")
        p.add_argument("--ray-shared", action="store_true",
                       help="with --ray: the inputs and --out are on storage every node sees at the same path (a "
                            "shared volume): each actor reads its photo and writes its results there, so the "
                            "photos never pass through this machine (it keeps the run record in --out)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:  # the evaluation toolkit has its own parser and needs no server
        from diffpriv_eval.cli import main as eval_main

        with _sigterm_as_interrupt():  # --wrong-keys may start the embedded ComfyUI
            return eval_main(argv[1:])
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.command == "report":
        return _report_main(args)
    if args.command == "keygen":
        return _run(args)
    if args.demo_weights and (args.server or args.trust_server):
        parser.error("--demo-weights runs the embedded ComfyUI: leave out --server")
    if args.ray is not None and (args.server or args.trust_server):
        parser.error("--ray starts its own ComfyUI servers on the cluster: leave out --server")
    if args.ray_actors is not None and (args.ray is None or args.ray_actors < 1):
        parser.error("--ray-actors N needs --ray and N >= 1")
    if args.ray_gpus_per_actor is not None and (args.ray is None or args.ray_gpus_per_actor < 0):
        parser.error("--ray-gpus-per-actor G needs --ray and G >= 0")
    if args.ray_cpus_per_actor != 1.0 and (args.ray is None or args.ray_cpus_per_actor <= 0):
        parser.error("--ray-cpus-per-actor C needs --ray and C > 0")
    if getattr(args, "photos_per_prompt", None) is not None and not 1 <= args.photos_per_prompt <= \
            photo_batches.MAX_PHOTOS_PER_PROMPT:
        parser.error(f"--photos-per-prompt N needs 1 <= N <= {photo_batches.MAX_PHOTOS_PER_PROMPT}")
    if getattr(args, "photos_per_prompt", None) is not None and args.ray is not None:
        parser.error("--photos-per-prompt: with --ray each actor runs one photo a prompt; leave it out")
    if args.ray_shared and args.ray is None:
        parser.error("--ray-shared needs --ray")
    if args.max_in_flight < 1:
        parser.error("--max-in-flight N needs N >= 1")
    if getattr(args, "margin", None) is not None and (not args.target_similarity or not 0 <= args.margin <= 1):
        parser.error("--margin COSINE needs --target-similarity and 0 <= COSINE <= 1")
    if getattr(args, "min_face_size", None) is not None and not 12 <= args.min_face_size <= 4096:
        parser.error("--min-face-size PX needs 12 <= PX <= 4096 (the detector's smallest window is 12 px)")
    if getattr(args, "min_face_score", None) is not None and not 0 <= args.min_face_score <= 1:
        parser.error("--min-face-score SCORE needs 0 <= SCORE <= 1")
    if getattr(args, "no_guidance", False) and args.target_similarity:
        parser.error("--no-guidance runs without the energy guidance that --target-similarity steers: choose one")
    return _run(args)


def _run(args) -> int:
    with _sigterm_as_interrupt():
        try:
            return args.func(args)
        except (UsageError, PreflightError, FileNotFoundError, FileExistsError, ValueError) as exc:
            print(f"diffpriv: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("diffpriv: stopped; run the same command again to finish the rest", file=sys.stderr)
            return 130


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The arguments, photos (or keys) after the options included:
    `diffpriv protect --task hide --out o/ a.jpg b.jpg`."""
    args, extra = parser.parse_known_args(argv)
    inputs = "images" if hasattr(args, "images") else "keys" if hasattr(args, "keys") else None
    if extra and (inputs is None or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        getattr(args, inputs).extend(map(Path, extra))
    return args


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """The embedded ComfyUI runs in its own session, so it would outlive a terminated
    command: SIGTERM gets the same clean stop as Ctrl-C (signals reach the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


# --- commands ------------------------------------------------------------------------
def protect_command(args) -> int:
    template = load_template(args)
    passphrase = read_passphrase(args.passphrase_env)
    if args.recipient and passphrase:
        raise UsageError("--recipient and --passphrase-env: choose one (a key file is sealed one way)")
    if args.recipient:
        key_crypto.check_recipient(args.recipient)
        secrets = KeySecrets(recipient=args.recipient)
    elif passphrase:  # the server seals to this run's own recipient; the passphrase stays here
        identity = key_crypto.new_identity()
        secrets = KeySecrets(passphrase, str(identity), str(identity.to_public()))
    else:
        secrets = KeySecrets()
    check_out_folder(args.out)
    photos = collect_inputs(args.images, PICTURE_SUFFIXES, "picture")
    refuse = partial(refused_photos, whole_image=graphs.msi_sees_the_photo(template))
    return run_command(args, photos, template, protect_jobs, secrets, refuse)


def recover_command(args) -> int:
    template = load_template(args)
    passphrase = read_passphrase(args.passphrase_env)
    untrusted = [url for url in args.server if url not in args.trust_server]
    if untrusted:
        raise UsageError(f"recover sends each key, opened on this machine, to the server that runs the recovery, "
                         f"and the server writes the original: name {untrusted[0]} with --trust-server instead of "
                         "--server if you trust it with that (or leave both out: the embedded ComfyUI)")
    if args.photo is not None and (problem := photo_problem(args.photo, whole_image=False)):
        raise UsageError(f"--photo {args.photo}: {problem}")
    identity = ""
    if args.identity is not None:
        identity = str(key_crypto.read_identity_file(args.identity, passphrase))
        passphrase = ""
    secrets = KeySecrets(passphrase, identity)
    keys = collect_inputs(args.keys, (KEY_SUFFIX,), "key file")
    check_passphrase(keys.found, secrets.opened, passphrase=bool(passphrase), identity=bool(identity))
    check_out_folder(args.out)
    refuse = partial(refused_keys, passphrase=bool(passphrase), identity=bool(identity))
    return run_command(args, keys, template, recover_jobs, secrets, refuse)


def keygen_command(args) -> int:
    if args.passphrase_env is not None:
        passphrase = read_passphrase(args.passphrase_env)
    elif sys.stdin.isatty():
        passphrase = getpass.getpass("passphrase for the identity file: ")
        if getpass.getpass("the same again: ") != passphrase:
            raise UsageError("the two passphrases differ")
    else:
        raise UsageError("keygen needs a passphrase for the identity file: --passphrase-env VAR, or a terminal")
    if not passphrase:
        raise UsageError("the identity file's passphrase is empty")
    recipient = key_crypto.write_identity_file(args.identity, passphrase)
    print(f"identity written to {args.identity} (keep it, and its passphrase, safe: it opens every key sealed to it)",
          file=sys.stderr)
    print(recipient)
    return 0


# A command's jobs: make_jobs(args, template, secrets, conn, todo) -> list[Job]. Module
# functions, so a Ray actor can make the same jobs on its own server.
def protect_jobs(args, template: dict, secrets: KeySecrets, conn: Connection, todo: dict[str, Path]) -> list[Job]:
    return [Job(name, path, partial(_protect_graph, template, path, name, secrets.recipient, args.seed, args.steps),
                check=partial(check_protected, path, args.strict, whole_image=args.whole_image))
            for name, path in todo.items()]


def recover_jobs(args, template: dict, secrets: KeySecrets, conn: Connection, todo: dict[str, Path]) -> list[Job]:
    return [Job(name, path, partial(_recover_graph, template, path, name, secrets, args.photo))
            for name, path in todo.items()]


def cleanup_of(args) -> Cleanup:
    return Cleanup(keep_files=args.keep_on_server)


def run_command(args, inputs: Inputs, template: dict, make_jobs, secrets: KeySecrets, refuse) -> int:
    """Refuse (all at once) what cannot be done, skip what an earlier run made from the
    same bytes with the same settings, run the rest, report; exit status 1 if one of this
    run's inputs failed. summary.json is written from the record at the end, however the
    run ends."""
    summary = Summary(args.out, args.command, run_settings(args, template, secrets))
    try:
        todo = plan_inputs(summary, inputs, refuse, key_stem if args.command == "recover" else _photo_stem)
        if args.ray is not None:
            from .cluster import run_on_ray  # imports ray: only here

            opener = secrets.opened if args.command == "recover" else None
            not_removed = run_on_ray(args, template, secrets.for_servers(), make_jobs, todo, summary,
                                     seal_key=secrets.seal if secrets.passphrase else None,
                                     open_key=opener) if todo else []
            return report(summary, args, not_removed)
        with connect(args, needed=bool(todo)) as conn:
            preflight_models(conn, template, args)
            jobs = make_jobs(args, template, secrets, conn, todo)
            if args.command == "protect":
                jobs = in_prompts(jobs, photos_per_prompt(args, template, conn))
            not_removed = run_batch(jobs, conn.servers, summary, cleanup_of(args), seal_key=secrets.seal)
            if args.demo_weights and args.command == "protect":
                not_removed += demo.check_recovery(summary, template, secrets, conn.servers, cleanup_of(args),
                                                   _recover_graph)
        return report(summary, args, not_removed)
    finally:
        summary.finish()
        summary.write_json()
        summary.close()


def photos_per_prompt(args, template: dict, conn: Connection) -> int:
    """--photos-per-prompt, or its default for these servers; 1 (said, when it was asked
    for) when the workflow's faces cannot share a batch across photos."""
    problem = photo_batches.grouping_problem(template)
    if problem is not None:
        if (args.photos_per_prompt or 1) > 1:
            print(f"diffpriv: --photos-per-prompt: {problem}; one photo per prompt", file=sys.stderr)
        return 1
    return photo_batches.photos_per_prompt(conn.servers, args.photos_per_prompt)


def _photo_stem(path: Path) -> str:
    return path.stem


def _protect_graph(template, path: Path, name: str, recipient: str, seed, steps, session: JobSession) -> dict:
    uploaded = upload_photo(session, path)
    return graphs.protect_graph(template, uploaded, name, seed=seed, steps=steps, folder=session.folder,
                                recipient=recipient)


def _recover_graph(template, key_file: Path, name: str, secrets: KeySecrets, photo: Path | None,
                   session: JobSession) -> dict:
    """The key is opened here: only the opened key goes to the (embedded or trusted) server."""
    try:
        key = session.upload_key(secrets.opened(key_file.read_bytes()))
    except KeyFileError as exc:
        raise KeyFileError(f"{key_file.name}: {exc}") from None
    image = upload_photo(session, photo) if photo is not None else None
    return graphs.recover_graph(template, key, name, image_name=image, folder=session.folder)


# --- pieces --------------------------------------------------------------------------
def load_template(args) -> dict:
    path = args.workflow or graphs.default_workflow(workflow_name(args))
    template = graphs.load_workflow(path)
    command = "recover --photo" if args.command == "recover" and args.photo is not None else args.command
    missing = graphs.missing_nodes(template, command)
    if missing:
        raise UsageError(f"the workflow {path} lacks what `diffpriv {command}` fills in: {'; '.join(missing)} "
                         "(see 'Your own workflows' in docs/cli.md)")
    if args.command == "protect" and args.target_similarity:
        graphs.set_target_similarity(template, args.margin)
    if args.command == "protect" and (args.min_face_size, args.min_face_score, args.detector) != (None,) * 3:
        graphs.set_face_detection(template, args.min_face_size, args.min_face_score, args.detector)
    if args.command == "protect" and args.no_guidance:
        graphs.set_no_guidance(template)
    if args.command == "protect" and args.one_embedding:
        graphs.set_one_embedding(template)
    for name in graphs.ablations(template) if args.command == "protect" else []:
        print(f"diffpriv: running the paper's ablation {graphs.ABLATIONS[name]}: for measuring, not for publishing",
              file=sys.stderr)
    if args.demo_weights:
        demo.use_demo_models(template)
        demo.apply_settings(template)
    return template


def workflow_name(args) -> str:
    """The shipped workflow for what was asked: every face or the whole image, per task; a
    key's picture, or its face back into a photo."""
    if args.command == "recover":
        return "recover" if args.photo is None else "recover_face"
    return args.task if args.whole_image else f"{args.task}_faces"


def check_out_folder(out: Path) -> None:
    """--out is a folder we can write in (made if missing), checked before anything starts."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder: give a folder (it is made if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None


def plan_inputs(summary: Summary, inputs: Inputs, refuse, stem_of) -> dict[str, Path]:
    """{name: path} of the inputs this run does. Refused inputs (missing, unreadable) are
    recorded as failed and listed at once; inputs an earlier run made from the same bytes
    with the same settings are recorded as skipped; the others get their name (a new one
    where the stem stands for other bytes or settings)."""
    refused = {path: problem for path, problem in inputs.missing.items()}
    refused.update(refuse(inputs.found))
    if refused:
        print(f"refused before queueing ({len(refused)} of {len(inputs.missing) + len(inputs.found)}):")
    for path, problem in refused.items():
        name = summary.refused_name(stem_of(path))
        print(f"  {name}: {problem}" + (f" ({path})" if name != stem_of(path) else ""))
        summary.record(name, path, "failed", error=f"refused before queueing: {problem}")
    todo: dict[str, Path] = {}
    seen: dict[str, Path] = {}  # sha256 -> the input of this run with those bytes
    skipped = 0
    for path in inputs.found:
        if path in refused:
            continue
        digest = summary.sha256(path)
        if digest in seen:
            print(f"{path}: the same bytes as {seen[digest]}: done once")
            continue
        seen[digest] = path
        plan = summary.plan(stem_of(path), digest)
        if plan.done is not None:
            summary.mark_skipped(plan.name, plan.done, path)
            skipped += 1
            if skipped <= SKIPS_SHOWN:
                print(f"{plan.name}: done in an earlier run from the same bytes and settings, skipped")
            continue
        if plan.name != stem_of(path):
            print(f"{path}: {stem_of(path)}/ holds results of other bytes or settings: done as {plan.name}/")
        todo[plan.name] = path
    if skipped > SKIPS_SHOWN:
        print(f"... {skipped} in all done in earlier runs, skipped")
    return todo


SKIPS_SHOWN = 20  # skipped inputs named one by one; past that, counted


def run_settings(args, template: dict, secrets: KeySecrets) -> dict:
    """What a result depends on besides the input's bytes: a result made with the same
    settings from the same bytes is the same, so a rerun skips it."""
    settings = {"command": args.command, "workflow": hashlib.sha256(canonical(template).encode()).hexdigest(),
                "models": model_fingerprints(template, local_models_folder(args)),
                "recognizers": sorted({node["inputs"].get("model_name") for node in
                                       graphs.nodes_of(template, "DiffPrivacyFaceRecognizerLoader")} - {None}),
                "encrypted": bool(secrets.passphrase or secrets.recipient)}
    if args.command == "protect":
        settings.update(task=args.task, seed=args.seed, steps=args.steps, whole_image=args.whole_image)
        if args.strict:  # a photo done with possible faces is not done for --strict
            settings["strict"] = True
    elif args.photo is not None:
        settings["photo"] = hashlib.sha256(args.photo.read_bytes()).hexdigest()
    return settings


def local_models_folder(args) -> Path | None:
    """The models folder the servers will load from, where this machine can read it."""
    if args.server:
        return None  # another machine's, or at least not ours to read
    if args.demo_weights:  # on a cluster, each node generates its own
        return demo.models_dir(CACHE_DIR) if args.ray is None else None
    folder = args.models or (None if args.ray is not None else (args.base or CACHE_DIR / "comfy") / "models")
    return folder if folder is not None and folder.is_dir() else None


def key_stem(path: Path) -> str:
    return path.name[: -len(KEY_SUFFIX)] if path.name.endswith(KEY_SUFFIX) else path.stem


def read_passphrase(variable: str | None) -> str:
    if variable is None:
        return ""
    if variable not in os.environ:
        raise UsageError(f"--passphrase-env {variable}: the environment variable {variable} is not set")
    return os.environ[variable]


def preflight_models(conn: Connection, template: dict, args) -> None:
    hint = f"diffpriv {args.command} ... --demo-weights"
    for server in conn.servers:
        check_models(server.client, graphs.required_models(template), conn.embedded_models, hint)


def report(summary: Summary, args, not_removed: list[str]) -> int:
    """Print this run's outcome (and, apart, what earlier runs left failed); 1 if one of this
    run's inputs failed or something stayed on a server."""
    # Keys are not pictures: a recovery's sheet shows the results only.
    pages = write_contact_sheet(summary, show_source=summary.command == "protect")
    counts = summary.counts()
    print(f"{summary.path}: " + (", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "nothing to do"))
    results = summary.results
    failed = {name: entry["error"] or "" for name, entry in results.items() if entry["status"] == "failed"}
    for name, error in failed.items():  # every failure together, with the first line of its reason
        print(f"  {name}: failed: {error.splitlines()[0] if error else 'no reason given'}")
    earlier = summary.earlier()
    if earlier:
        left = Counter(entry["status"] for entry in earlier.values())
        print(f"earlier results in {summary.out_dir} not among this run's inputs: "
              + ", ".join(f"{n} {status}" for status, n in sorted(left.items())) + " (summary.json: earlier)")
    if pages:
        print(f"contact sheet: {pages[0]}" + (f" ... {pages[-1].name} ({len(pages)} pages of at most "
                                              f"{PAGE_PHOTOS} photos)" if len(pages) > 1 else ""))
    if not_removed:
        print(f"diffpriv: {len(not_removed)} file(s) or records could not be removed from the server(s):\n  "
              + "\n  ".join(not_removed), file=sys.stderr)
    if getattr(args, "demo_weights", False):
        print(demo.BANNER, file=sys.stderr)
    return 1 if counts.get("failed") or not_removed else 0


def report_command(args) -> int:
    summary = latest_run(args.out)
    try:
        summary.write_json()
        return report(summary, args, [])
    finally:
        summary.close()


def _report_main(args) -> int:
    try:
        return report_command(args)
    except FileNotFoundError as exc:
        print(f"diffpriv: {exc}", file=sys.stderr)
        return 2


# --- servers -------------------------------------------------------------------------
@contextlib.contextmanager
def connect(args, needed: bool = True, **embedded_options) -> Iterator[Connection]:
    """The servers given with --server, or the embedded ComfyUI for the time of the run
    (none at all when everything was done in an earlier run); ``embedded_options`` go to
    EmbeddedComfy."""
    if not needed:
        yield Connection([])
        return
    urls = list(dict.fromkeys(normalise_url(u) for u in args.server + args.trust_server))
    if urls:
        yield Connection([Server(u, args.max_in_flight, prompt_timeout_s=args.prompt_timeout) for u in urls])
        return
    models = args.models
    if args.demo_weights:
        print(demo.BANNER, file=sys.stderr)
        models = demo.models_dir(CACHE_DIR)
        print(f"--demo-weights: {demo.MODELS_WORDS}", file=sys.stderr)
        if args.command == "protect":
            print(f"--demo-weights: {demo.SETTINGS.describe(args.steps)}", file=sys.stderr)
    base = args.base or CACHE_DIR / ("comfy-demo" if args.demo_weights else "comfy")
    prepare_base_directory(base, models)
    # --disable-metadata: the graph (and so any passphrase) never lands in PNG metadata.
    comfy = EmbeddedComfy(base, extra_args=["--disable-metadata"], **embedded_options)
    print(f"starting ComfyUI in {base} (log: {comfy.log_path}) ...", file=sys.stderr)
    with comfy:
        yield Connection([Server(comfy.url, args.max_in_flight, token=comfy.token,
                                 prompt_timeout_s=args.prompt_timeout)], embedded_models=base / "models")


def normalise_url(url: str) -> str:
    return url if "://" in url else f"http://{url}"


if __name__ == "__main__":
    # As the package's module, not __main__: the modules it imports (cluster.py) raise its
    # UsageError, which main() must catch as its own.
    from diffpriv_client.cli import main as package_main

    sys.exit(package_main())
