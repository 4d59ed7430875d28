from cage_lens.loading import from_hf_model, load_hf_directory
