"""The JAX trainer: Flax GPT-2, optax, orbax, jit over a device mesh.

Entry points for other code:
    model.build_model(model_config, precision) -> GPT         logits = gpt.apply({"params": params}, ids)
        the training loss, fused with the head:                loss = gpt.apply({"params": params}, ids, targets=ys)
    model.cross_entropy(logits, targets, vocab_size)           the same loss from logits (padded vocab masked)
    checkpoint.load_checkpoint_params(path) -> (config, params)  from a run dir, checkpoints/ or a step folder
    sample.generate(gpt, params, prompts, max_new_tokens, temperature=, top_k=, seed=)  int32 [B, new tokens]
    step.build_trainer(config, mesh) -> Trainer                the jitted train_step/eval_step over the mesh
    step.compile_on_zeros(trainer) -> jax.stages.Compiled      the step compiled (not run) for its shapes alone
    memory.plan(config, data, fsdp) / memory.step_bytes(trainer)  bytes per device, planned or as compiled
    hlo.collectives(hlo_text) / hlo.hlo_kinds(hlo_text)        what a compiled step moves between devices, and does
    stepper.JaxStepper(config, micro_batches)                  the step on fixed batches, to time or profile it
    train.main(argv) / train.train(config, run_dir)            what scripts/train_jax.py runs
"""
