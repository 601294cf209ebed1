"""Write a tiny Hugging Face checkpoint (Qwen2 / Llama / Qwen3) with a locally trained tokenizer.

    python tools/make_tiny_model.py OUT_DIR [--arch qwen2] [--hidden-size 128] [--untied] ...
"""
import argparse

from megatron_intuitor.models.tiny import ARCHITECTURES, make_tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--arch", default="qwen2", choices=sorted(ARCHITECTURES))
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--untied", action="store_true", help="separate lm_head weights")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = make_tiny_model(args.out_dir, arch=args.arch, hidden_size=args.hidden_size,
                          num_layers=args.num_layers, num_heads=args.num_heads,
                          num_kv_heads=args.num_kv_heads,
                          intermediate_size=args.intermediate_size, vocab_size=args.vocab_size,
                          tie_word_embeddings=not args.untied, seed=args.seed)
    print(out)


if __name__ == "__main__":
    main()
