"""Errors a user can act on: each message names the file or setting and the fix."""


class FastRSBError(Exception):
    """A user-facing error; the CLI prints it without a traceback and exits with status 2."""


def missing_extra(package: str, extra: str) -> FastRSBError:
    return FastRSBError(
        f"{package} is not installed; install the extra: pip install 'fastrsb[{extra}]'"
        + (" (FFCV compiles against libturbojpeg and OpenCV: run ./setup.sh, or apt-get install "
           "pkg-config libturbojpeg0-dev libopencv-dev first)" if extra == "ffcv" else "")
    )
