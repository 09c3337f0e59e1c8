import pandas as pd

from hetpure_bench.leaderboard import COLUMNS, write_leaderboards


def _row(**changes):
    row = {
        "defense": "hetpure", "defense_config": "t_l=200", "classifier": "c", "diffusion_model": "d",
        "data_source": "cifar10-jpeg", "threat": "Linf", "eps": "0.0313725", "attack": "PGD-EOT",
        "gradient_mode": "full", "evaluation": "single", "n_images": 32, "seed": 0,
        "clean_acc": 0.8, "robust_acc": 0.5, "robust_by_attack": "-", "sanity": "ok",
        "nfe": 10, "wall_s": 12.0, "images_per_s": 2.6667, "peak_mem_mib": 900, "device": "cpu (2 threads)",
        "preset": "smoke", "setup_hash": "h" + str(sorted(changes.items())),
    }
    row.update(changes)
    return row


def test_one_row_per_setup_the_newest_wins_best_first(tmp_path):
    rows = [_row(), _row(defense="none", robust_acc=0.0, nfe=0), _row(robust_acc=0.6, wall_s=11.0)]  # oldest first
    written = write_leaderboards(rows, tmp_path)
    assert written == [tmp_path / "cifar10-jpeg-Linf.csv"]
    csv = pd.read_csv(written[0])
    assert list(csv.columns) == COLUMNS
    assert csv.defense.tolist() == ["hetpure", "none"]  # sorted by robust accuracy
    assert csv.loc[csv.defense == "hetpure", "robust_acc"].tolist() == [0.6]  # the rerun's numbers
    markdown = (tmp_path / "cifar10-jpeg-Linf.md").read_text()
    assert ("| hetpure | t_l=200 | c | d | cifar10-jpeg | Linf | 0.0313725 | PGD-EOT | full | single | 32 | 0 | "
            "80.0 | 60.0 | - | ok | 10 | 11.0 | 2.67 | 900 | cpu (2 threads) |") in markdown
    write_leaderboards(rows + [_row(seed=1)], tmp_path)  # another seed is another setup
    assert len(pd.read_csv(written[0])) == 3


def test_each_data_source_and_threat_model_gets_its_own_files(tmp_path):
    rows = [_row(), _row(threat="L2", eps="0.5"), _row(data_source="cifar10-official")]
    names = sorted(p.name for p in write_leaderboards(rows, tmp_path))
    assert names == ["cifar10-jpeg-L2.csv", "cifar10-jpeg-Linf.csv", "cifar10-official-Linf.csv"]
    assert all(len(pd.read_csv(tmp_path / n)) == 1 for n in names)
