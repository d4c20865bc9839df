"""The models sites train: the patch-token MoE classifier and the MoE building blocks (moe), the
byte-level MoE language model (charlm), and Hugging Face transformers MoE families (hf_moe, with
what is checked of a model folder before anything is imported in hf_families)."""
