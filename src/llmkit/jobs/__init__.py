"""The job layer every command shares (pretrain, finetune, align; later ppo, compress, serve):

    model_section.py   ModelSection: `from` a checkpoint or a preset with ModelConfig fields
    tokenizers.py      setup_tokenizer: train char / BPE on the job's texts, or load one;
                       encode_prompt: a generation prompt's ids (empty: end-of-text)
    artifacts.py       save_artifacts / load_artifacts: model, tokenizer, head, adapter, manifest
    peft_block.py      apply_peft_block: a recipe's `peft:` block -> a PEFT handle

Jobs import from here and from the packages below (model, io, train, data, objectives, peft);
no job imports another job's module.
"""
