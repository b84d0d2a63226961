"""Whisper's input features: 16 kHz mono audio, zero-padded to the model's fixed window, turned into a log-mel
spectrogram (Hann STFT of 400 samples every 160, slaney mel filters, log10, floor 8 below each example's peak,
scaled to about [-1, 1]), as the Whisper checkpoints were trained on. Also the resampler that brings any rate
to 16 kHz. Plain torch, batched, so training computes features without a per-example numpy round trip."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SAMPLE_RATE = 16_000
N_FFT = 400
HOP_LENGTH = 160
# Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above (27 mels per factor of 6.4).
_LINEAR_HZ_PER_MEL = 200.0 / 3.0
_LOG_START_HZ = 1000.0
_LOG_START_MEL = _LOG_START_HZ / _LINEAR_HZ_PER_MEL
_MELS_PER_LOG_HZ = 27.0 / math.log(6.4)


@dataclass(frozen=True)
class FeatureShape:
    """What one model takes: `n_mels` filters over a window of `n_frames` STFT frames (the encoder's positions
    times its convolutions' stride of 2)."""

    n_mels: int
    n_frames: int

    @property
    def n_samples(self) -> int:
        return self.n_frames * HOP_LENGTH

    @property
    def seconds(self) -> float:
        return self.n_samples / SAMPLE_RATE

    @classmethod
    def of_model(cls, config) -> FeatureShape:
        """The shape a WhisperConfig's encoder accepts (it refuses any other frame count)."""
        return cls(n_mels=config.num_mel_bins, n_frames=2 * config.max_source_positions)


def _hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    linear = hz / _LINEAR_HZ_PER_MEL
    logarithmic = _LOG_START_MEL + torch.log(hz.clamp(min=_LOG_START_HZ) / _LOG_START_HZ) * _MELS_PER_LOG_HZ
    return torch.where(hz >= _LOG_START_HZ, logarithmic, linear)


def _mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    linear = mel * _LINEAR_HZ_PER_MEL
    logarithmic = _LOG_START_HZ * torch.exp((mel.clamp(min=_LOG_START_MEL) - _LOG_START_MEL) / _MELS_PER_LOG_HZ)
    return torch.where(mel >= _LOG_START_MEL, logarithmic, linear)


def mel_filters(n_mels: int, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """[n_fft // 2 + 1, n_mels] triangular filters evenly spaced in slaney mels from 0 Hz to Nyquist, each scaled
    to unit area (slaney norm), in float64."""
    edges_hz = _mel_to_hz(torch.linspace(0.0, float(_hz_to_mel(torch.tensor(sample_rate / 2.0, dtype=torch.float64))), n_mels + 2, dtype=torch.float64))
    bins_hz = torch.linspace(0.0, sample_rate // 2, n_fft // 2 + 1, dtype=torch.float64)
    offsets = edges_hz[None, :] - bins_hz[:, None]  # [bins, n_mels + 2]
    widths = edges_hz.diff()
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    triangles = torch.minimum(rising, falling).clamp(min=0.0)
    return triangles * (2.0 / (edges_hz[2:] - edges_hz[:-2]))[None, :]


def pad_or_trim(waveforms: list[torch.Tensor], n_samples: int) -> torch.Tensor:
    """[len(waveforms), n_samples]: each 1-D waveform zero-padded at the end (the caller refuses longer ones)."""
    batch = torch.zeros(len(waveforms), n_samples, dtype=torch.float32)
    for row, wave in enumerate(waveforms):
        length = min(wave.numel(), n_samples)
        batch[row, :length] = wave[:length]
    return batch


def log_mel_spectrogram(waveforms: torch.Tensor, n_mels: int, filters: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, n_mels, n_samples // 160] log-mel features of [batch, n_samples] 16 kHz waveforms (already padded to
    the window); computed in the waveforms' dtype."""
    if filters is None:
        filters = mel_filters(n_mels)
    window = torch.hann_window(N_FFT, dtype=waveforms.dtype, device=waveforms.device)
    spectrum = torch.stft(waveforms, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = spectrum[..., :-1].abs() ** 2  # the centred STFT has one frame more than the window holds: drop it
    mel = filters.to(waveforms).T @ power
    log_mel = mel.clamp(min=1e-10).log10()
    # A floor 8 decades (80 dB) below each example's loudest bin, so silence padding does not dominate the scale.
    peak = log_mel.amax(dim=(1, 2), keepdim=True)
    return (torch.maximum(log_mel, peak - 8.0) + 4.0) / 4.0


def resample(waveform: torch.Tensor, from_rate: int, to_rate: int = SAMPLE_RATE, zero_crossings: int = 6, rolloff: float = 0.99) -> torch.Tensor:
    """A 1-D waveform at `from_rate` resampled to `to_rate` by band-limited (Hann-windowed sinc) interpolation,
    polyphase: one filter per output phase of the reduced rate ratio, applied as a strided convolution. The
    cut-off sits at `rolloff` times the lower Nyquist frequency so nothing above it aliases."""
    if from_rate == to_rate:
        return waveform
    divisor = math.gcd(from_rate, to_rate)
    up, down = to_rate // divisor, from_rate // divisor
    cutoff = min(up, down) * rolloff  # in cycles per `down` input samples
    half_width = math.ceil(zero_crossings * down / cutoff)
    taps = torch.arange(-half_width, half_width + down, dtype=torch.float64) / down
    phases = -torch.arange(up, dtype=torch.float64)[:, None] / up
    t = ((phases + taps[None, :]) * cutoff).clamp(-zero_crossings, zero_crossings)
    window = torch.cos(t * math.pi / zero_crossings / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, torch.ones_like(t), t))
    kernels = (sinc * window * (cutoff / down)).to(waveform.dtype)[:, None, :]
    padded = torch.nn.functional.pad(waveform[None, None, :], (half_width, half_width + down))
    out = torch.nn.functional.conv1d(padded, kernels, stride=down)  # [1, up, frames]
    out = out[0].transpose(0, 1).reshape(-1)
    return out[: math.ceil(up * waveform.numel() / down)]
