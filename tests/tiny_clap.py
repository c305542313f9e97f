"""A tiny random CLAP model saved as a transformers folder (no download), shared by the CLAP tests."""
import torch

SR = 48000          # the tiny model's rate, as the real CLAP models
WINDOW = 24000      # its window: 0.5 s (the real ones: 10 s)


def tiny_clap(folder, fusion=False, seed=0):
    """A random ClapModel small enough to run in milliseconds, saved as a transformers folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import (ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor,
                              RobertaTokenizerFast)

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(c, len(vocab))
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    bpe.decoder = decoders.ByteLevel()
    tokenizer = RobertaTokenizerFast(tokenizer_object=bpe)

    audio = dict(spec_size=64, num_mel_bins=64, window_size=4, patch_size=4, patch_stride=(4, 4), depths=[1, 1],
                 num_attention_heads=[1, 2], hidden_size=32, patch_embeds_hidden_size=16, projection_dim=16,
                 num_hidden_layers=2)
    if fusion:
        audio.update(enable_fusion=True, fusion_type="aff_2d")
    cfg = ClapConfig(text_config=dict(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=32, max_position_embeddings=100,
                                      projection_dim=16),
                     audio_config=audio, projection_dim=16)
    torch.manual_seed(seed)
    model = ClapModel(cfg).eval()
    fe = ClapFeatureExtractor(feature_size=64, sampling_rate=SR, hop_length=480, max_length_s=WINDOW / SR,
                              fft_window_size=1024, frequency_min=50, frequency_max=14000,
                              truncation="fusion" if fusion else "rand_trunc", padding="repeatpad")
    model.save_pretrained(folder, safe_serialization=True)
    ClapProcessor(feature_extractor=fe, tokenizer=tokenizer).save_pretrained(folder)
    return folder
