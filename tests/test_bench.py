"""bench.py times real training steps and writes a profiler trace."""

from glassgpt.bench import main


def test_bench_times_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = main(["--device=cpu", "--compile=False", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=8",
              "--batch_size=2", "--num_steps=3", "--real_data=False"])
    assert r["ms_per_iter"] > 0 and r["tokens_per_s"] > 0 and r["mfu"] is None  # CPU: no made-up peak


def test_bench_profile_writes_trace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["--device=cpu", "--compile=False", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=8",
          "--batch_size=2", "--profile=True", "--real_data=False"])
    traces = list((tmp_path / "bench_log").glob("*.json"))
    assert traces and traces[0].stat().st_size > 1000
