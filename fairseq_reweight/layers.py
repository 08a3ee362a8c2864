"""Which layers of a fairseq model the ``--meta-grad fast`` probes watch (``--meta-params``)."""

from torch import nn


def probe_layers(model, spec: str):
    """``--meta-params`` -> ``[(name, nn.Linear, batch_dim)]`` for :class:`LayerProbe`."""
    decoder = model.decoder
    stack = getattr(decoder, "layers", None)
    last = stack[-1] if stack is not None and len(stack) else None
    has_ffn = all(isinstance(getattr(last, n, None), nn.Linear) for n in ("fc1", "fc2"))
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if parts == ["auto"]:
        # the encoder's FFNs carry the clean-vs-corrupted signal of the meta-gradient; the embeddings/output
        # projection carry none on misaligned Multi30k (scripts/meta_signal.py, examples/multi30k/meta_signal.md)
        enc_layers = getattr(model.encoder, "layers", None)
        embeds = [getattr(getattr(model, side, None), "embed_tokens", None) for side in ("encoder", "decoder")]
        if enc_layers is not None and len(enc_layers) and has_ffn and all(
                isinstance(getattr(layer, n, None), nn.Linear) for layer in enc_layers for n in ("fc1", "fc2")):
            parts = ["encoder"]
        else:
            parts = ["embed"] if all(isinstance(e, nn.Embedding) for e in embeds) else ["output"]
    layers = []
    for part in parts:
        if part == "ffn":
            if not has_ffn:
                raise ValueError(f"--meta-params ffn: the decoder of {type(model).__name__} has no transformer "
                                 "layers with fc1/fc2; use --meta-params output (or --meta-grad fd)")
            i = len(stack) - 1
            # fairseq's transformer layers are time-major: [T, B, C]
            layers += [(f"decoder.layers.{i}.fc1", last.fc1, 1), (f"decoder.layers.{i}.fc2", last.fc2, 1)]
        elif part in ("decoder", "encoder"):
            sub = getattr(model, part)
            if getattr(sub, "layers", None) is None or not has_ffn:
                raise ValueError(f"--meta-params {part}: only for transformer models; use --meta-params output")
            # feed-forward blocks only: fairseq's attention calls its projections' weights directly
            layers += [(f"{part}.layers.{i}.{fc}", getattr(layer, fc), 1)
                       for i, layer in enumerate(sub.layers) for fc in ("fc1", "fc2")]
        elif part == "embed":
            for side in ("encoder", "decoder"):
                emb = getattr(getattr(model, side), "embed_tokens", None)
                if not isinstance(emb, nn.Embedding):
                    raise ValueError(f"--meta-params embed: the {side} has no nn.Embedding embed_tokens")
                layers.append((f"{side}.embed_tokens", emb, 0))  # one module shared by both sides: watched once
            # tied output projection (--share-decoder-input-output-embed / --share-all-embeddings): the same
            # parameter, so `embed` is that parameter's whole gradient, lookups and output projection
            proj = getattr(decoder, "output_projection", None)
            if isinstance(proj, nn.Linear) and proj.weight is getattr(decoder.embed_tokens, "weight", None):
                layers.append(("decoder.output_projection", proj, 0))

        elif part == "output":
            for name in ("output_projection", "fc_out"):
                if isinstance(getattr(decoder, name, None), nn.Linear):
                    layers.append((f"decoder.{name}", getattr(decoder, name), 0))
                    break
            else:
                raise ValueError(f"--meta-params output: the decoder of {type(model).__name__} has no nn.Linear "
                                 "output projection (adaptive softmax, or an LSTM with tied embeddings); use "
                                 "--meta-params ffn or --meta-grad fd")
        else:
            raise ValueError(f"--meta-params {spec!r}: use auto, or a comma-separated list of ffn, decoder, "
                             "encoder, embed, output")
    return layers
