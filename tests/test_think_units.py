

def test_no_think_builds_the_base_model_only(think_dir, tmp_path):
    """--no-think on a checkpoint with think/: no think artifacts, no thinking switch in fusion, no LoRA in the
    decoder, and the manifest has no think section."""
    from af3trt.build.build_engines import build, options_from_args, parser

    args = parser().parse_args(["--hf-model", str(think_dir.parent), "--out", str(tmp_path / "out"), "--no-think"])
    opts = options_from_args(args)
    assert opts.think is False
    build(opts)
    out = tmp_path / "out"
    assert not (out / "artifacts" / "think").exists()
    assert "think" not in json.loads((out / "manifest.json").read_text())
    fusion = (out / "model_repository" / "fusion" / "config.pbtxt").read_text()
    decoder = (out / "model_repository" / "decoder" / "config.pbtxt").read_text()
    assert '"think"' not in fusion and "lora_task_id" not in fusion and "lora_dir" not in decoder
