"""The default speech recipes end to end: CTC encoder pretraining + speech adapter, then the test split.

Slow (about 18 minutes on 2 CPU cores; the recipes bound their own time: encoder max_time 8 min, adapter
max_time 11 min): the adapter must transcribe the 400 held-out utterances with WER <= 10 % (jiwer, after
lower-casing and removing punctuation). Runs in a temporary working directory.
"""

import pytest

from sensorium.eval import wer


@pytest.mark.slow
def test_spoken_words_recipes_transcribe_held_out_speech(speech_run):
    results, minutes = speech_run.results, speech_run.minutes
    score = wer([r["prediction"] for r in results], [r["reference"] for r in results])
    print(f"data + encoder {minutes['encoder']:.1f} min + adapter {minutes['adapter']:.1f} min; test WER {score:.3f}")
    assert len(results) >= 300
    assert minutes["encoder"] + minutes["adapter"] <= 20
    assert score <= 0.10
