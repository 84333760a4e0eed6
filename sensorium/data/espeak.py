"""Offline speech synthesis with the eSpeak NG library that the PyPI wheel ``espeakng-loader`` ships.

The wheel carries ``libespeak-ng.so`` and its ``espeak-ng-data`` folder but no Python synthesis API, so
this module drives the C API through ctypes: initialise with the data path passed explicitly, select a
voice (``"en-us+f2"``: language voice plus optional variant), set rate / pitch / pitch range, and collect
the int16 samples a synthesis callback receives (22050 Hz with the shipped data).

Each call loads a fresh instance of the library and unloads it afterwards. eSpeak keeps synthesis state
in static variables that ``espeak_ng_Terminate`` does not reset (the pitch "flutter" phase, the gain
control, cycle counters), so with one long-lived instance the same text and voice gave a different
waveform on every call (measured: four calls, four waveforms of 16820-16834 samples). A fresh instance
with a fixed random seed makes :func:`synthesize` a pure function of its arguments, which keeps the
synthetic data sets reproducible; the load costs about 2 ms (about 300 short utterances/s in total, against
670 with one instance). Should another part of the process hold the same library file open (a phonemiser,
say), unloading does nothing and that guarantee is lost.

The library is process-global, so one lock serialises every call. A data folder the library cannot use
makes it ``exit()`` the process from ``espeak_Initialize``; this module checks the folder first and
initialises with ``espeak_ng_Initialize``, which reports a status instead, so bad data is a clear
:class:`SpeechSynthesisError`.
"""

import ctypes
import hashlib
import os
import tempfile
import threading
from pathlib import Path

import numpy as np

from sensorium.errors import SensoriumError

INSTALL_HINT = "pip install --no-deps espeakng-loader"
REQUIRED_DATA_FILES = ("phontab", "phonindex", "phondata", "intonations")  # read by espeak_ng_Initialize
_MAX_DATA_PATH = 150  # the library copies the path into a 160-byte buffer and appends file names

# eSpeak NG C API constants (speak_lib.h, espeak_ng.h)
_ENOUTPUT_MODE_SYNCHRONOUS = 0x0001
_ESPEAK_RATE, _ESPEAK_PITCH, _ESPEAK_RANGE = 1, 3, 4
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_BUFFER_MS = 1000  # per callback; shorter buffers cut the echo tail of voices with echo (60 ms did, measured)
_SEED = 0  # eSpeak's noise generator is seeded from the clock at initialisation; fix it

RATE_RANGE = (80, 450)  # words per minute that eSpeak honours
PITCH_RANGE = (0, 100)


class SpeechSynthesisError(SensoriumError, RuntimeError):
    """eSpeak NG is not installed, its data folder is unusable, or it rejected a voice."""


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_LOCK = threading.Lock()
_chunks: list[bytes] = []  # filled by the callback while _LOCK is held


@_SynthCallback
def _collect(wav, num_samples: int, events) -> int:  # module level: the library keeps a pointer to it
    if wav and num_samples > 0:
        _chunks.append(ctypes.string_at(wav, 2 * num_samples))
    return 0  # 0 = continue synthesis


def _reset_lock_in_child() -> None:
    global _LOCK
    _LOCK = threading.Lock()  # a fork taken while another thread synthesised must not inherit a held lock


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_in_child)


def _default_paths() -> tuple[Path, Path]:
    try:
        import espeakng_loader
    except ImportError as e:
        raise SpeechSynthesisError(f"eSpeak NG is not installed; install it with `{INSTALL_HINT}`") from e
    library = Path(espeakng_loader.get_library_path())
    try:
        data = Path(espeakng_loader.get_data_path())
    except RuntimeError as e:  # the wheel raises when its data folder is missing
        raise SpeechSynthesisError(f"the espeakng-loader wheel has no data folder ({e}); reinstall it with "
                                   f"`{INSTALL_HINT} --force-reinstall`") from e
    return library, data


def _recorded_sizes(folder: Path) -> dict[str, int]:
    """Sizes the ``espeakng-loader`` wheel's RECORD gives for the required files, if ``folder`` is the wheel's."""
    from importlib.metadata import PackageNotFoundError, files

    try:
        recorded = files("espeakng-loader") or []
    except PackageNotFoundError:
        return {}
    return {f.name: f.size for f in recorded if f.name in REQUIRED_DATA_FILES and f.size is not None
            and Path(f.locate()).resolve().parent == folder}


def check_data_path(path: str | Path) -> Path:
    """Return ``path`` resolved if it is an eSpeak NG data folder, else raise :class:`SpeechSynthesisError`.

    The library must never see a bad folder: ``espeak_Initialize`` calls ``exit()`` on a missing one, and a
    truncated ``phondata`` crashed the process (measured), so the wheel's own folder is also checked
    against the file sizes its RECORD lists.
    """
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise SpeechSynthesisError(f"eSpeak NG data folder {folder} does not exist")
    missing = [name for name in REQUIRED_DATA_FILES if not (folder / name).is_file()]
    if missing:
        raise SpeechSynthesisError(f"eSpeak NG data folder {folder} lacks {', '.join(missing)}: not an "
                                   f"espeak-ng-data folder (reinstall with `{INSTALL_HINT} --force-reinstall`)")
    for name, size in _recorded_sizes(folder).items():
        actual = (folder / name).stat().st_size
        if actual != size:
            raise SpeechSynthesisError(f"eSpeak NG data file {folder / name} is damaged ({actual} bytes, the wheel "
                                       f"installed {size}); reinstall with `{INSTALL_HINT} --force-reinstall`")
    return folder


def _short_alias(folder: Path) -> Path:
    """``folder`` itself, or a short symlink to it when its path overflows the library's path buffer."""
    if len(os.fsencode(folder)) <= _MAX_DATA_PATH:
        return folder
    digest = hashlib.sha1(os.fsencode(folder)).hexdigest()[:12]
    alias = Path(tempfile.gettempdir()) / f"sensorium-espeak-{digest}"
    if not (alias.is_symlink() and alias.resolve() == folder):
        tmp = alias.with_name(f"{alias.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(folder, target_is_directory=True)
        os.replace(tmp, alias)  # atomic: concurrent processes agree on the same alias
    if len(os.fsencode(alias)) > _MAX_DATA_PATH:
        raise SpeechSynthesisError(f"eSpeak NG data path {folder} is longer than {_MAX_DATA_PATH} bytes and "
                                   f"the temporary folder {alias.parent} is too deep for a short alias")
    return alias


class Espeak:
    """A speech synthesiser over the eSpeak NG shared library.

    Args:
        library: path of ``libespeak-ng``; default: the one in the ``espeakng-loader`` wheel.
        data_path: the ``espeak-ng-data`` folder; default: the one in the wheel. It is always passed to
            the library explicitly, so an eSpeak installed elsewhere on the system is never picked up.

    Nothing is loaded until the first :meth:`synthesize`; paths are checked then, once.
    """

    def __init__(self, *, library: str | Path | None = None, data_path: str | Path | None = None) -> None:
        self._library_arg, self._data_arg = library, data_path
        self._paths: tuple[Path, Path] | None = None  # (library, data folder as passed to the library)
        self._data_real: Path | None = None  # the data folder, symlinks resolved
        self._lang_files: dict[str, Path] | None = None  # voice name (lower case) -> its file under lang/
        self._sample_rate: int | None = None

    def _resolve(self) -> tuple[Path, Path]:
        if self._paths is None:
            library, data = (None, None)
            if self._library_arg is None or self._data_arg is None:
                library, data = _default_paths()
            library = Path(self._library_arg) if self._library_arg is not None else library
            data = Path(self._data_arg) if self._data_arg is not None else data
            if not library.is_file():
                raise SpeechSynthesisError(f"eSpeak NG library {library} does not exist; install it with "
                                           f"`{INSTALL_HINT}`")
            self._data_real = check_data_path(data)
            self._paths = (library, _short_alias(self._data_real))
        return self._paths

    @property
    def data_path(self) -> Path:
        """The eSpeak NG data folder in use."""
        self._resolve()
        assert self._data_real is not None, "paths resolved without a data folder"
        return self._data_real

    def _voice_files(self) -> dict[str, Path]:
        if self._lang_files is None:
            self._lang_files = {p.name.lower(): p for p in (self.data_path / "lang").rglob("*") if p.is_file()}
        return self._lang_files

    def voices(self) -> list[str]:
        """Names of the language voices in the data folder (``"en"``, ``"en-us"``, ...), lower case.

        A few voices of the wheel have no dictionary there (``fo``, ``kaa``, ``xex``); they raise on use.
        """
        return sorted(self._voice_files())

    def _check_voice(self, voice: str) -> None:
        """Raise for an unknown variant or a voice whose dictionary is missing (eSpeak would go silent)."""
        data = self.data_path
        base, _, variant = voice.partition("+")
        if variant and not (data / "voices" / "!v" / variant).is_file():  # eSpeak ignores unknown variants
            raise SpeechSynthesisError(f"unknown eSpeak voice variant {variant!r} in {voice!r} "
                                       f"(known: {', '.join(self.variants())})")
        file = self._voice_files().get(base.lower())
        if file is None:
            return  # maybe a voice's display name; eSpeak itself reports unknown voices
        lines = file.read_text(errors="replace").splitlines()
        named = [ln.split()[1] for ln in lines if ln.startswith("dictionary ") and len(ln.split()) > 1]
        dictionary = named[0] if named else file.name.split("-")[0].lower()
        if not (data / f"{dictionary}_dict").is_file():
            raise SpeechSynthesisError(f"eSpeak voice {base!r} needs {dictionary}_dict, which {data} lacks")

    def variants(self) -> list[str]:
        """Names of the voice variants that may follow ``+`` in a voice name (``"m3"``, ``"f2"``, ...)."""
        return sorted(p.name for p in (self.data_path / "voices" / "!v").iterdir() if p.is_file())

    @property
    def sample_rate(self) -> int:
        """Output sample rate in Hz (22050 with the shipped data); synthesises a word on first use."""
        if self._sample_rate is None:
            self.synthesize("a")
        assert self._sample_rate is not None, "synthesis did not report a sample rate"
        return self._sample_rate

    def synthesize(self, text: str, *, voice: str = "en", rate: int = 175, pitch: int = 50,
                   pitch_range: int = 50) -> tuple[np.ndarray, int]:
        """Speak ``text``; return ``(samples, sample_rate)``, samples float32 mono in ``[-1, 1]``.

        Args:
            text: plain text (no SSML); digits are read as numbers, so spell them out to hear digits.
            voice: a language voice, optionally with a variant: ``"en"``, ``"en-us"``, ``"en-gb-scotland+m3"``.
            rate: speaking rate in words per minute, 80-450.
            pitch: base pitch, 0-100 (50 is the voice's normal pitch).
            pitch_range: intonation range, 0-100 (0 is monotone).

        The result depends on the arguments only: the same call gives the same samples.
        """
        if not text.strip():
            raise ValueError("text to synthesise is empty")
        if not RATE_RANGE[0] <= rate <= RATE_RANGE[1]:
            raise ValueError(f"rate {rate} is outside {RATE_RANGE[0]}-{RATE_RANGE[1]} words per minute")
        for name, value in (("pitch", pitch), ("pitch_range", pitch_range)):
            if not PITCH_RANGE[0] <= value <= PITCH_RANGE[1]:
                raise ValueError(f"{name} {value} is outside {PITCH_RANGE[0]}-{PITCH_RANGE[1]}")
        library, data = self._resolve()
        self._check_voice(voice)
        with _LOCK:
            samples, sample_rate = _synthesize_fresh(library, data, text, voice=voice, rate=rate, pitch=pitch,
                                                     pitch_range=pitch_range)
        self._sample_rate = sample_rate
        return samples, sample_rate


def _status_message(lib: ctypes.CDLL, status: int) -> str:
    buf = ctypes.create_string_buffer(512)
    lib.espeak_ng_GetStatusCodeMessage(ctypes.c_int(status), buf, ctypes.c_size_t(len(buf)))
    return buf.value.decode(errors="replace") or f"status 0x{status & 0xFFFFFFFF:08x}"


def _synthesize_fresh(library: Path, data: Path, text: str, *, voice: str, rate: int, pitch: int,
                      pitch_range: int) -> tuple[np.ndarray, int]:
    """One synthesis on a freshly loaded library instance (caller holds ``_LOCK``)."""
    import _ctypes

    try:
        lib = ctypes.CDLL(str(library))
    except OSError as e:
        raise SpeechSynthesisError(f"cannot load the eSpeak NG library {library}: {e}; reinstall it with "
                                   f"`{INSTALL_HINT} --force-reinstall`") from e
    lib.espeak_ng_InitializePath.argtypes = [ctypes.c_char_p]
    lib.espeak_ng_Initialize.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    lib.espeak_ng_ClearErrorContext.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    lib.espeak_ng_InitializeOutput.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p]
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    initialised = False
    try:
        lib.espeak_ng_InitializePath(os.fsencode(data))
        context = ctypes.c_void_p()
        status = lib.espeak_ng_Initialize(ctypes.byref(context))
        if status != 0:
            lib.espeak_ng_ClearErrorContext(ctypes.byref(context))
            raise SpeechSynthesisError(f"eSpeak NG cannot use its data folder {data.resolve()}: "
                                       f"{_status_message(lib, status)}")
        initialised = True
        status = lib.espeak_ng_InitializeOutput(_ENOUTPUT_MODE_SYNCHRONOUS, _BUFFER_MS, None)
        if status != 0:
            raise SpeechSynthesisError(f"eSpeak NG output initialisation failed: {_status_message(lib, status)}")
        sample_rate = int(lib.espeak_ng_GetSampleRate())
        lib.espeak_SetSynthCallback(_collect)
        lib.espeak_ng_SetRandSeed(_SEED)
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise SpeechSynthesisError(f"unknown eSpeak voice {voice!r} (voices are the file names under "
                                       f"{data.resolve() / 'lang'}, e.g. en, en-us, en-gb-scotland)")
        for param, value in ((_ESPEAK_RATE, rate), (_ESPEAK_PITCH, pitch), (_ESPEAK_RANGE, pitch_range)):
            lib.espeak_SetParameter(param, int(value), 0)  # after the voice: selecting a voice resets them
        encoded = text.encode()
        _chunks.clear()
        err = lib.espeak_Synth(encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None)
        lib.espeak_Synchronize()
        if err != 0:
            raise SpeechSynthesisError(f"eSpeak NG failed to synthesise {text!r} (error {err})")
        pcm = np.frombuffer(b"".join(_chunks), dtype=np.int16)
    finally:
        _chunks.clear()
        if initialised:
            lib.espeak_ng_Terminate()
        _ctypes.dlclose(lib._handle)  # the next call maps the library afresh, with its statics reset
    return (pcm.astype(np.float32) / 32768.0), sample_rate


_default: Espeak | None = None


def default_synthesizer() -> Espeak:
    """The process-wide :class:`Espeak` over the ``espeakng-loader`` wheel's library and data."""
    global _default
    if _default is None:
        _default = Espeak()
    return _default


def synthesize(text: str, *, voice: str = "en", rate: int = 175, pitch: int = 50,
               pitch_range: int = 50) -> tuple[np.ndarray, int]:
    """Speak ``text`` with the wheel's eSpeak NG; return float32 samples in ``[-1, 1]`` and the sample rate.

    See :meth:`Espeak.synthesize` for the arguments.
    """
    return default_synthesizer().synthesize(text, voice=voice, rate=rate, pitch=pitch, pitch_range=pitch_range)
