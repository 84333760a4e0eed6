"""Sampled-frame reading (decord ``get_batch`` on the sampled indices) against decoding every frame with PyAV.

Run:  python bench/video_frames.py [--clips 40] [--frames 64] [--size 224] [--sample 8] [--gop 250]

Both read the same in-memory H.264 mp4 clips (moving shapes, made here with PyAV) and return the same
uniformly sampled frames as uint8 arrays; the script checks they agree, then prints clips/s and the ratio
PyAV time / decord time (> 1: sampled reading is faster). ``--gop`` sets the keyframe interval: with
long GOPs the decoder still has to decode from the previous keyframe, so the saving is in colour
conversion and copies; short GOPs let it skip.
"""

import argparse
import io
import time

import av
import numpy as np

from sensorium.data.synthetic import render_moving_clip
from sensorium.encoders.video import DecordReader, sample_indices


def encode(frames: list[np.ndarray], gop: int) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=24, options={"preset": "veryfast", "crf": "20", "g": str(gop)})
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    return buf.getvalue()


def pyav_all_frames(data: bytes, num: int) -> np.ndarray:
    with av.open(io.BytesIO(data)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return np.stack([frames[i] for i in sample_indices(len(frames), num)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--sample", type=int, default=8)
    parser.add_argument("--gop", type=int, default=250)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    clips = [encode(render_moving_clip(rng, size=args.size, frames=args.frames)[0], args.gop) for _ in range(args.clips)]
    reader = DecordReader()
    for data in clips[:3]:
        a, b = reader(data, args.sample), pyav_all_frames(data, args.sample)
        assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 3, "readers disagree"
    t0 = time.perf_counter()
    for data in clips:
        reader(data, args.sample)
    t_decord = time.perf_counter() - t0
    t0 = time.perf_counter()
    for data in clips:
        pyav_all_frames(data, args.sample)
    t_pyav = time.perf_counter() - t0
    print(f"{args.clips} clips of {args.frames} frames at {args.size}px (GOP {args.gop}), {args.sample} sampled per clip")
    print("| decord sampled | PyAV every frame | ratio |\n|---|---|---|")
    print(f"| {args.clips / t_decord:.1f} clips/s | {args.clips / t_pyav:.1f} clips/s | {t_pyav / t_decord:.2f}x |")


if __name__ == "__main__":
    main()
