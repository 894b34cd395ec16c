"""The example workflows' photo, put in ComfyUI's input folder so their Load Image opens it."""
from __future__ import annotations

import logging
from pathlib import Path

import folder_paths

from diffpriv_core.files import write_new_file

log = logging.getLogger("diffprivacy")

EXAMPLE_PHOTO = Path(__file__).resolve().parent.parent / "example_workflows" / "input" / "astronaut.png"
# The name the workflows' Load Image asks for: prefixed, so it never takes a user's own file's name.
INPUT_NAME = "diffprivacy_astronaut.png"


def provide_example_photo() -> None:
    """Copy the photo into the input folder once; a file already there is left alone."""
    target = Path(folder_paths.get_input_directory()) / INPUT_NAME
    if target.exists():
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_new_file(target, EXAMPLE_PHOTO.read_bytes(), mode=0o644)
    except FileExistsError:
        pass
    except OSError as exc:
        log.warning("Diff-Privacy: could not put the example photo in %s (%s); the example workflows' Load "
                    "Image then needs a photo of your own", target.parent, exc)
