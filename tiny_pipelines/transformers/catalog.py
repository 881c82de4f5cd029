"""Every tiny transformer, and the transformer classes diffusers exports that are not image or video denoisers."""

from __future__ import annotations

from tiny_pipelines.transformers import TinyTransformer, a_to_f, g_to_m, m_to_z

TINY_TRANSFORMERS: tuple[TinyTransformer, ...] = (
    *a_to_f.TRANSFORMERS,
    *g_to_m.TRANSFORMERS,
    *m_to_z.TRANSFORMERS,
)

# Exported from diffusers.models.transformers, outside what the server denoises: audio, music, proteins,
# a prior over image embeddings, and a temporal layer of a UNet.
NOT_DENOISERS: dict[str, str] = {
    "AceStepTransformer1DModel": "music generation (1-D audio latents)",
    "LongCatAudioDiTTransformer": "audio generation",
    "MiniMaxMusic3Transformer1DModel": "music generation (1-D audio latents)",
    "MiniMaxMusic3RVQDepthDecoder": "an audio codec's decoder",
    "StableAudioDiTModel": "audio generation",
    "StableAudio3DiTModel": "audio generation",
    "T5FilmDecoder": "spectrogram diffusion for music",
    "RFD4ProteinaTransformer": "protein structure generation",
    "PriorTransformer": "a prior over CLIP image embeddings (Kandinsky 2, Shap-E), not a denoiser of latents",
    "TransformerTemporalModel": "a temporal layer inside video UNets, not a denoiser of its own",
    "DreamLiteTransformer2DModel": "a cross-attention stage inside DreamLite's UNet, which is the denoiser",
}
