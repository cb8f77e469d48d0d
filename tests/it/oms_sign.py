"""Signs a model directory with the OpenSSF Model Signing reference library (model_signing).

The command line signs with SHA-256 of whole files only; the library also signs BLAKE3 and
shards, so the tests sign through it:

    python oms_sign.py key|certificate sha256|blake3 files|SHARD_SIZE MODEL_DIR SIGNATURE \
        PRIVATE_KEY [SIGNING_CERTIFICATE CHAIN...]
"""

import pathlib
import sys

from model_signing import hashing, signing


def main() -> None:
    method, hash_type, serialization, model, signature, key, *certs = sys.argv[1:]
    config = hashing.Config()
    if serialization == "files":
        config.use_file_serialization(hashing_algorithm=hash_type)
    else:
        config.use_shard_serialization(
            hashing_algorithm=hash_type, shard_size=int(serialization)
        )
    # The signature itself lands in the model's directory: not part of what is signed.
    config.add_ignored_paths(
        model_path=pathlib.Path(model), paths=[pathlib.Path(signature).name]
    )
    signer = signing.Config().set_hashing_config(config)
    if method == "key":
        signer.use_elliptic_key_signer(private_key=key)
    else:
        signer.use_certificate_signer(
            private_key=key, signing_certificate=certs[0], certificate_chain=certs[1:]
        )
    signer.sign(pathlib.Path(model), pathlib.Path(signature))


if __name__ == "__main__":
    main()
