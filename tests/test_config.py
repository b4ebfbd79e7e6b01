import re
from pathlib import Path

import pytest

from ml.config import Config, ConfigError, load_config, parse_overrides
from ml.errors import InvalidInput

ROOT = Path(__file__).resolve().parents[1]


def test_csv_schema_names_may_hold_spaces_but_not_types():
    cfg = load_config(None, ["ingest.format=csv", "ingest.path=x", "ingest.csv_header=false",
                             "ingest.csv_schema=[user id, item id, ts]"])
    assert cfg.ingest.csv_schema == ["user id", "item id", "ts"]


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["warehouse=/tmp/x", "spark.shuffle_partitions=3", "generate.stay_prob=0.5",
                             "ingest.behaviors=[pv, buy]"])
    assert cfg.warehouse == "/tmp/x"
    assert cfg.spark.shuffle_partitions == 3
    assert cfg.generate.stay_prob == 0.5
    assert cfg.ingest.behaviors == ["pv", "buy"]
    assert cfg.table_path("actions") == "/tmp/x/actions"


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError, match=r"unknown key 'spark.shuffle_partition'.*shuffle_partitions"):
        load_config(None, ["spark.shuffle_partition=3"])


def test_bad_choice_names_key_and_allowed_values():
    with pytest.raises(ConfigError, match=r"ingest.format='xls'.*'taobao'"):
        load_config(None, ["ingest.format=xls"])
    with pytest.raises(ConfigError, match=r"generate.stay_prob"):
        load_config(None, ["generate.stay_prob=1.5"])


@pytest.mark.parametrize("override,message", [
    ("graph.window=abc", "graph.window='abc' must be an integer"),
    ("graph.window=2.5", "graph.window=2.5 must be an integer"),
    ("train.epochs=0.5", "train.epochs=0.5 must be an integer"),
    ("generate.num_users=true", "generate.num_users=True must be an integer"),
    ("train.lr=abc", "train.lr='abc' must be a number"),
    ("graph.decay=maybe", "graph.decay='maybe' must be true or false"),
    ("ingest.csv_header=1", "ingest.csv_header=1 must be true or false"),
    ("ingest.min_ts=abc", "ingest.min_ts='abc' must be an integer"),
    ("eval.ks=5", "eval.ks=5 must be a list"),
    ("spark.conf=3", "spark.conf=3 must be a mapping"),
    ("natm.dropout=2", r"natm.dropout=2 must be in \[0, 1\)"),
    ("samples.max_items=0", "samples.max_items=0 must be a number > 0"),
    ("ingest.min_ts=1600000000000", r"ingest.min_ts=1600000000000 is not a time in seconds .* e.g. 1600000000 "),
    ("ingest.max_ts=-253402300800", r"ingest.max_ts=-253402300800 is not a time in seconds"),
    ("sequences.max_length=-1", "sequences.max_length=-1 must be a number > 0"),
    ("train.lr=nan", "train.lr=nan must be a finite number"),
    ("eval.compare_to=cooc", r"eval.compare_to='cooc' must be a list, e.g. --set 'eval.compare_to=\[cooc\]'"),
    ("eval.compare_to=[pop, coc]", r"eval.compare_to='coc' is not allowed; expected one of \['pop', 'cooc', .*'cooc_recent'"),
    ("ingest.csv_schema=user_id long, ts string", r"e.g. --set 'ingest.csv_schema=\[user_id, item_id, ts\]': the column "
                                                  "names in file order, no types"),
    ("ingest.csv_schema=[user_id long, ts string]", "ingest.csv_schema: 'user_id long' is not a column name; .*without types"),
    ("ingest.ts_unit=sec", r"ingest.ts_unit='sec' is not allowed; expected one of \['s', 'ms', 'us', 'ns', 'string'\]"),
    ("warehouse=", "warehouse=None must be a string .an empty value is no value"),
    ("spark.master=banana", "spark.master='banana' is not a Spark master URL; expected local"),
    ("spark.conf.spark.sql.shuffle.partitions=3", "set spark.shuffle_partitions instead"),
    # accepted before, then ignored (a negative MLM weight turned MLM off), built into a zero-width layer,
    # or failing at the model's build or the first step without the key
    ("natm.mlm_weight=-0.5", "natm.mlm_weight=-0.5 must be a number >= 0"),
    ("natm.ffn_mult=0", "natm.ffn_mult=0 must be a number > 0"),
    ("natm.weight_buckets=1", "natm.weight_buckets=1 must be >= 2"),
    ("train.weight_decay=-1", "train.weight_decay=-1 must be a number >= 0"),
    ("dat.lambda_ca=-5", "dat.lambda_ca=-5 must be a number >= 0"),
    ("dat.lambda_u=-1", "dat.lambda_u=-1 must be a number >= 0"),
    ("dat.cal_min_items=1", "dat.cal_min_items=1 must be >= 2"),
    # passed the Spark stages (hashed with the rows) and stopped the training reader, without the key
    ("seed=-1", r"seed=-1 must be a whole number in \[0, 2\^63\)"),
    ("seed=9223372036854775808", r"seed=9223372036854775808 must be a whole number in \[0, 2\^63\)"),
    ("train.shuffle_buffer=-1", "train.shuffle_buffer=-1 must be a number >= 0"),
    # accepted, then an AMBIGUOUS_REFERENCE in the evaluation (after training), or `rank <= true`
    ("eval.ks=[1, 5, 10, 10]", r"eval.ks=\[1, 5, 10, 10\] names a cut-off more than once"),
    ("eval.ks=[1, true]", r"eval.ks=\[1, True\] must be a non-empty list of positive integers"),
    # a 10-item fused list scored at 50 and 100 gave HR@10 three times, without a word
    ("recent.triggers=5", None),
    ("spark.driver_memory=lots", "spark.driver_memory='lots' is not a memory size; expected .* e.g. 512m, 4g"),
    ("spark.conf.spark.driver.memory=64g", "spark.conf.spark.driver.memory: set spark.driver_memory instead"),
    ("spark.conf.spark.master=yarn", "spark.conf.spark.master: set spark.master instead"),
    ("ingest.behaviors=[]", r"ingest.behaviors=\[\] lists nothing; expected a list of behaviour values, or null"),
    ("sequences.behaviors=[1, 2]", "sequences.behaviors: 1 is not a name; expected a list of behaviour values"),
    ("dat.user_fields=[1]", "dat.user_fields: 1 is not a name; expected a list of keys"),
    ("generate.min_actions_per_user=60000", "generate.min_actions_per_user=60000 must be <= "
                                            "generate.max_actions_per_user=50000"),
    ("generate.table=actions", r"generate.table='actions' must be a table name .* not one of the pipeline's own"),
    ("generate.table=../x", r"generate.table='../x' must be a table name"),
])
def test_a_value_of_the_wrong_type_fails_when_read_naming_the_key_and_the_type(override, message):
    # before: some were a TypeError without the key ("graph.: '<=' not supported ..."), others
    # (window=2.5, min_ts=abc, dropout=2) passed and failed in a job after Spark work
    if message is None:  # a setting that passes alone, and fails beside another
        assert load_config(None, [override])
        return
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_the_generators_forbidden_table_names_are_every_table_the_stages_write():
    # config keeps its own list (it imports no pyspark); a table added to ml.schemas must join it
    from ml import schemas as S
    from ml.config import _PIPELINE_TABLES
    from ml.data import samples

    written = {v for k, v in vars(S).items() if k.startswith("T_")}
    written |= {samples.T_SAMPLES_NATM, samples.T_SAMPLES_DAT, samples.T_NOISE_Q}
    assert written <= _PIPELINE_TABLES, sorted(written - _PIPELINE_TABLES)


def test_settings_that_fail_together_name_both_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"eval.ks=\[1, 5, 10, 50, 100\] goes up to 100, but recent.k=10 .*raise "
                                          "recent.k"):
        load_config(None, ["recent.triggers=5", "recent.k=10"])
    assert load_config(None, ["recent.triggers=0", "recent.k=10"]).recent.k == 10  # the stage is off
    with pytest.raises(ConfigError, match=r"ingest.csv_schema names \['TS', 'ts'\] more than once"):
        load_config(None, ["ingest.format=csv", "ingest.path=x", "ingest.csv_header=false",
                           "ingest.csv_schema=[user_id, item_id, ts, TS]"])
    with pytest.raises(ConfigError, match="ingest.csv_schema names the columns of a header-less CSV; set "
                                          "ingest.csv_header=false"):
        load_config(None, ["ingest.format=csv", "ingest.path=x", "ingest.csv_schema=[user_id, item_id, ts]"])
    (tmp_path / "w.yaml").write_text("warehouse: ' '\n")  # a blank warehouse wrote into the working directory
    with pytest.raises(ConfigError, match="warehouse=' ' must name a directory or URI"):
        load_config(tmp_path / "w.yaml", [])
    # sizes the JVM's -Xmx takes pass; a bare number (bytes there) and Spark's "gb" do not
    for size in ("512m", "4g", "2G", "1t"):
        assert load_config(None, [f"spark.driver_memory={size}"]).spark.driver_memory == size
    for size in ("1024", "8gb", "4 g"):
        with pytest.raises(ConfigError, match=f"spark.driver_memory='{size}' is not a memory size"):
            load_config(None, [f"spark.driver_memory={size}"])
    with pytest.raises(ConfigError, match="generate.table='Items' must be a table name"):
        load_config(None, ["generate.table=Items"])
    assert load_config(None, ["generate.table=raw_actions_v2", "dat.user_fields=[]"]).generate.table == "raw_actions_v2"


def test_edge_values_that_are_settings_pass():
    # 0 is the reader's "keep the files' row order" (it was refused by the config alone)
    assert load_config(None, ["train.shuffle_buffer=0", "seed=0"]).train.shuffle_buffer == 0
    assert load_config(None, [f"seed={2 ** 63 - 1}"]).seed == 2 ** 63 - 1


def test_master_urls_spark_accepts_pass_and_fixed_formats_take_no_column_mapping():
    for master in ("local", "local[4]", "local[*]", "local[2, 3]", "local-cluster[1,2,1024]", "yarn",
                   "spark://h:7077", "k8s://https://h:6443"):
        assert load_config(None, [f"spark.master={master}"]).spark.master == master
    # the Taobao file has fixed columns: a mapping was silently ignored
    with pytest.raises(ConfigError, match=r"ingest.format='taobao' has fixed columns"):
        load_config(None, ["ingest.format=taobao", "ingest.path=x.csv", "ingest.columns.user_id=uid"])


def test_cli_log_level_takes_any_case_and_refuses_unknown_levels(capsys):
    from jobs._cli import parser

    assert parser("x").parse_args(["--log-level", "debug"]).log_level == "DEBUG"
    with pytest.raises(SystemExit):
        parser("x").parse_args(["--log-level", "VERBOSE"])
    assert "invalid choice: 'VERBOSE'" in capsys.readouterr().err


def test_number_fields_take_what_a_user_writes_for_numbers():
    # PyYAML reads 1e-3 as a string (YAML 1.1 wants 1.0e-3); an int is a number; null where optional
    cfg = load_config(None, ["train.lr=1e-3", "train.weight_decay=0", "train.grad_clip=null",
                             "spark.log_level='OFF'"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.grad_clip, cfg.spark.log_level) == (0.001, 0, None, "OFF")


def test_yaml_inherits_base(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 7\nspark:\n  shuffle_partitions: 5\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\nspark:\n  driver_memory: 1g\n")
    cfg = load_config(tmp_path / "run.yaml", ["seed=9"])
    assert (cfg.seed, cfg.spark.shuffle_partitions, cfg.spark.driver_memory) == (9, 5, "1g")


def test_configs_shipped_in_conf_load():
    from pathlib import Path

    for f in sorted((Path(__file__).parents[1] / "conf").glob("*.yaml")):
        assert isinstance(load_config(f), Config), f


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_overrides(["warehouse"])


def test_new_model_and_index_settings_are_checked_with_their_key():
    with pytest.raises(ConfigError, match=r"natm.negatives=20 must be <= samples.num_negatives=9"):
        load_config(None, ["natm.negatives=20", "samples.num_negatives=9"])
    with pytest.raises(ConfigError, match=r"natm.loss='bpr'.*'softmax'"):
        load_config(None, ["natm.loss=bpr"])
    with pytest.raises(ConfigError, match=r"natm.separate_encoders and natm.trigger_projection"):
        load_config(None, ["natm.separate_encoders=true", "natm.trigger_projection=true"])
    with pytest.raises(ConfigError, match=r"baseline.index='hnsw'.*'ivf'"):
        load_config(None, ["baseline.index=hnsw"])
    with pytest.raises(ConfigError, match=r"sequences.holdout"):
        load_config(None, ["sequences.holdout=0"])


def test_natm_combinations_the_model_rejects_fail_when_the_config_is_read():
    ml1m = ROOT / "conf" / "ml1m_natm.yaml"  # layers 0, residual, neighbour pointer
    with pytest.raises(ConfigError, match=r"natm.residual is for natm.layers=0.*natm.layers=2.*natm.residual=false"):
        load_config(ml1m, ["natm.layers=2"])
    assert load_config(ml1m, ["natm.layers=2", "natm.residual=false"]).natm.layers == 2
    with pytest.raises(ConfigError, match=r"natm.neighbor_pointer.*natm.num_neighbors=0.*natm.neighbor_pointer=false"):
        load_config(ml1m, ["natm.num_neighbors=0"])
    with pytest.raises(ConfigError, match=r"natm.dim=250 must be divisible by natm.heads=4"):
        load_config(None, ["natm.layers=1", "natm.dim=250"])
    assert load_config(None, ["natm.layers=0", "natm.dim=250", "natm.mlm_weight=0"]).natm.dim == 250  # no heads
    with pytest.raises(ConfigError, match=r"natm.mlm_weight=0.1 needs a transformer.*natm.layers=0"):
        load_config(None, ["natm.layers=0"])  # the default MLM term on the MLP encoder
    with pytest.raises(ConfigError, match=r"natm.mlm_prob=1 must be in \[0, 1\)"):
        load_config(None, ["natm.mlm_prob=1"])


def test_pipeline_state_that_cannot_be_read_means_rerun(tmp_path):
    from jobs import pipeline

    cfg = load_config(None, [f"warehouse={tmp_path}"])
    assert not pipeline._up_to_date(cfg, "graph")  # never ran
    state = tmp_path / "_pipeline" / "graph.json"
    state.parent.mkdir()
    state.write_text('{"fingerprint": ')  # a run killed while writing it (it is written atomically anyway)
    assert not pipeline._up_to_date(cfg, "graph")


def test_submit_entry_rejects_an_unknown_job():
    from jobs import submit

    with pytest.raises(SystemExit, match=r"JOB is one of generate, .*pipeline, vacuum \(got 'trian'\)"):
        submit.main(["trian"])


def test_a_job_reports_a_user_error_in_one_line_and_keeps_bugs_tracebacks(capsys):
    from jobs._cli import command
    from ml.data.io import TableNotFoundError

    @command
    def bad_config(argv):
        raise ConfigError("model='cooc' is not trainable here")

    with pytest.raises(SystemExit) as e:
        bad_config()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: ConfigError: model='cooc' is not trainable here" in err and "Traceback" not in err

    @command
    def bad_table(argv):
        raise TableNotFoundError("no Delta table at /tmp/x/sequences: run jobs.sequences first")

    with pytest.raises(SystemExit) as e:
        bad_table()
    assert e.value.code == 1 and "run jobs.sequences first" in capsys.readouterr().err

    @command
    def bug(argv):
        a, b = (1, 2, 3)  # a ValueError from a bug, not a user error: the traceback stays

    with pytest.raises(ValueError, match="too many values to unpack"):
        bug()


def test_a_job_run_from_the_command_line_exits_with_the_message_not_a_traceback():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "jobs.train", "--set", "model=cooc"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert "error: ConfigError: model='cooc' is not trainable here" in r.stderr and "Traceback" not in r.stderr


def test_free_text_keys_keep_their_dots_and_nested_or_mistyped_values_are_refused():
    cfg = load_config(None, ["spark.conf.spark.sql.session.timeZone=America/New_York",
                             "ingest.columns.user_id=visitor.id"])
    assert cfg.spark.conf == {"spark.sql.session.timeZone": "America/New_York"}  # before: split, then ignored
    assert cfg.ingest.columns == {"user_id": "visitor.id"}
    with pytest.raises(ConfigError, match=r"spark.conf.a=\{'b': 1\} must be a single value"):
        load_config(None, ["spark.conf={a: {b: 1}}"])
    with pytest.raises(ConfigError, match=r"dat.hidden=\['a'\] must be a non-empty list of positive sizes"):
        load_config(None, ["dat.hidden=[a]"])


def test_a_config_error_on_the_command_line_is_one_line():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "jobs.graph", "--set", "graph.windw=5"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(
        "error: ConfigError: unknown key 'graph.windw'; allowed keys: [")


# ---------------------------------------------------------------- review_pipeline findings 6-10


def test_natm_neighbours_beyond_the_graphs_top_n_are_refused_naming_both_keys():
    # before: accepted; the item graph keeps graph.top_n neighbours, so the extra slots were always padding
    with pytest.raises(ConfigError, match=r"natm.num_neighbors=20 must be <= graph.top_n=9.*padding"):
        load_config(None, ["model=natm", "natm.num_neighbors=20"])
    with pytest.raises(ConfigError, match=r"natm.num_neighbors=10 must be <= graph.top_n=9"):
        load_config(ROOT / "conf" / "ml1m_natm.yaml", ["natm.num_neighbors=10"])
    cfg = load_config(ROOT / "conf" / "ml1m_natm.yaml", ["natm.num_neighbors=20", "graph.top_n=20"])
    assert (cfg.natm.num_neighbors, cfg.graph.top_n) == (20, 20)
    assert load_config(None, ["model=natm", "natm.num_neighbors=3"]).natm.num_neighbors == 3
    # the other models do not read NATM's neighbours
    assert load_config(None, ["model=cooc", "natm.num_neighbors=20"]).model == "cooc"


def test_a_yaml_error_in_a_set_value_or_a_config_file_names_the_key_or_the_file(tmp_path):
    # before: a yaml.parser.ParserError traceback naming neither ('in "<unicode string>"')
    with pytest.raises(ConfigError, match=r"--set 'eval.compare_to=\[cooc, pop': not valid YAML: .*flow sequence"):
        load_config(None, ["eval.compare_to=[cooc, pop"])
    with pytest.raises(ConfigError, match=r"--set 'spark.conf=\{a: 1': not valid YAML"):
        load_config(None, ["spark.conf={a: 1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\ngraph:\n  window: [3\n")
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(bad))} is not valid YAML: .*line \d+"):
        load_config(bad)
    child = tmp_path / "child.yaml"
    child.write_text("base: bad.yaml\nseed: 2\n")
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(bad))} is not valid YAML"):
        load_config(child)


def test_a_yaml_error_in_a_set_value_exits_2_on_one_line_from_the_command_line():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "jobs.graph", "--set", "eval.compare_to=[cooc, pop"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2, r.stderr  # before: 1, with a 17-frame yaml traceback
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(
        "error: ConfigError: --set 'eval.compare_to=[cooc, pop': not valid YAML")


def test_a_string_field_takes_the_set_text_as_written():
    # before: YAML read '|' and '>' as empty block scalars (''), '#' as a comment (null), OFF as false
    for sep in ("|", ">", "#", ";", "\\t", " "):
        assert load_config(None, [f"ingest.csv_sep={sep}"]).ingest.csv_sep == sep
    assert load_config(None, ["spark.log_level=OFF"]).spark.log_level == "OFF"
    assert load_config(None, ["spark.log_level='OFF'", "spark.app_name=\"a: b\""]).spark.app_name == "a: b"
    assert load_config(None, ["spark.app_name=123"]).spark.app_name == "123"
    # spaces around the text go (`--set model= natm` was ' natm', refused), a value of spaces stays
    assert load_config(None, ["model= natm ", "ingest.path= /data/x.csv"]).ingest.path == "/data/x.csv"
    # null and an empty value are still no value
    cfg = load_config(None, ["ingest.path=null", "spark.master=~", "train.checkpoint_dir="])
    assert (cfg.ingest.path, cfg.spark.master, cfg.train.checkpoint_dir) == (None, None, None)
    # the values of the free-text mappings are strings too (a column named "on" is not True)
    cfg = load_config(None, ["ingest.columns.user_id=on", "spark.conf.spark.ui.enabled=false"])
    assert cfg.ingest.columns == {"user_id": "on"} and cfg.spark.conf == {"spark.ui.enabled": "false"}
    # other types are still read as YAML
    assert parse_overrides(["seed=3", "eval.ks=[1, 2]", "graph.decay=on"]) == {
        "seed": 3, "eval": {"ks": [1, 2]}, "graph": {"decay": True}}


def test_an_unquoted_yaml_boolean_for_a_string_field_in_a_file_gets_the_quote_hint(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("spark:\n  log_level: OFF\n")
    with pytest.raises(ConfigError, match=r"spark.log_level=False must be a string .quote it"):
        load_config(f)


def test_an_empty_csv_separator_is_refused_naming_the_key(tmp_path):
    # before: accepted, and ingest died in Spark with "Delimiter cannot be empty", naming no key
    f = tmp_path / "run.yaml"
    f.write_text("ingest:\n  csv_sep: ''\n")
    for source, overrides in ((None, ["ingest.csv_sep=''"]), (f, [])):  # from --set and from a file
        with pytest.raises(ConfigError, match=r"ingest.csv_sep='' must not be empty"):
            load_config(source, overrides)


def test_a_base_cycle_is_a_config_error_naming_the_files(tmp_path):
    # before: RecursionError
    (tmp_path / "self.yaml").write_text("base: self.yaml\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"self.yaml: its base: files inherit from it again: .*self.yaml -> .*self.yaml"):
        load_config(tmp_path / "self.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\nseed: 1\n")
    (tmp_path / "b.yaml").write_text("base: [c.yaml, a.yaml]\n")
    (tmp_path / "c.yaml").write_text("seed: 3\n")
    with pytest.raises(ConfigError, match=r"a.yaml -> .*b.yaml -> .*a.yaml"):
        load_config(tmp_path / "a.yaml")
    # two files inheriting the same base is no cycle
    (tmp_path / "d.yaml").write_text("base: c.yaml\nspark:\n  driver_memory: 1g\n")
    (tmp_path / "e.yaml").write_text("base: c.yaml\nspark:\n  shuffle_partitions: 3\n")
    (tmp_path / "f.yaml").write_text("base: [d.yaml, e.yaml]\n")
    cfg = load_config(tmp_path / "f.yaml")
    assert (cfg.seed, cfg.spark.driver_memory, cfg.spark.shuffle_partitions) == (3, "1g", 3)


def test_num_processes_with_the_local_launcher_is_refused_naming_the_launchers_that_use_it():
    # before: accepted; it trained in one process, yet a change of it reran the pipeline's training
    with pytest.raises(ConfigError, match=r"train.num_processes=4 is the world size of train.launcher=torchrun "
                                          r"or distributor; train.launcher='local'"):
        load_config(None, ["train.num_processes=4"])
    assert load_config(None, ["train.launcher=distributor", "train.num_processes=4"]).train.num_processes == 4
    assert load_config(None, ["train.launcher=torchrun", "train.num_processes=2"]).train.num_processes == 2
    assert load_config(None, ["train.launcher=local", "train.num_processes=1"]).train.launcher == "local"


def test_an_explicit_empty_mapping_replaces_the_inherited_one(tmp_path):
    (tmp_path / "base.yaml").write_text("ingest:\n  columns: {user_id: uid, item_id: iid}\n"
                                        "spark:\n  conf: {spark.executor.memory: 8g}\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\n")
    # before: {} merged into the base's mapping, which changed nothing
    cfg = load_config(tmp_path / "run.yaml", ["ingest.columns={}", "spark.conf={}"])
    assert (dict(cfg.ingest.columns), dict(cfg.spark.conf)) == ({}, {})
    # in a child YAML over its base
    (tmp_path / "child.yaml").write_text("base: base.yaml\ningest:\n  columns: {}\nspark:\n  conf: {}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (dict(cfg.ingest.columns), dict(cfg.spark.conf)) == ({}, {})
    # a grandchild that says nothing keeps the child's cleared mapping
    (tmp_path / "grandchild.yaml").write_text("base: child.yaml\nseed: 5\n")
    assert dict(load_config(tmp_path / "grandchild.yaml").ingest.columns) == {}
    # a non-empty mapping still adds to the inherited one, and --set applies in order
    cfg = load_config(tmp_path / "run.yaml", ["ingest.columns={ts: t}"])
    assert dict(cfg.ingest.columns) == {"user_id": "uid", "item_id": "iid", "ts": "t"}
    cfg = load_config(tmp_path / "run.yaml", ["ingest.columns={}", "ingest.columns.user_id=u"])
    assert dict(cfg.ingest.columns) == {"user_id": "u"}
    # a section is not a mapping field: an empty one changes nothing
    assert load_config(tmp_path / "run.yaml", ["spark={}"]).spark.conf == {"spark.executor.memory": "8g"}


def test_a_timestamp_window_that_holds_nothing_is_refused_naming_both_keys():
    # before: accepted; ingest rejected every row, after a full scan
    with pytest.raises(ConfigError, match=r"ingest.min_ts=20 must be <= ingest.max_ts=10"):
        load_config(None, ["ingest.min_ts=20", "ingest.max_ts=10"])
    cfg = load_config(None, ["ingest.min_ts=10", "ingest.max_ts=10"])
    assert (cfg.ingest.min_ts, cfg.ingest.max_ts) == (10, 10)
    assert load_config(None, ["ingest.min_ts=20"]).ingest.min_ts == 20  # one bound only


def test_a_cut_off_beyond_the_list_length_is_refused_naming_both_keys():
    # before: accepted; Pre@50 and Pre@100 were scored on 10-item lists
    with pytest.raises(ConfigError, match=r"eval.ks=\[1, 5, 10, 50, 100\] goes up to 100, but baseline.k=10"):
        load_config(None, ["baseline.k=10"])
    assert load_config(None, ["baseline.k=10", "eval.ks=[1, 5, 10]"]).baseline.k == 10
    assert load_config(None, ["eval.ks=[1, 100]", "baseline.k=100"]).eval.ks == [1, 100]


def test_an_unknown_ingest_column_field_shows_the_key_and_the_source_column():
    # was "ingest.columns key 'userid'='userid'": the key twice, and not the column it was given
    with pytest.raises(ConfigError, match=r"ingest.columns.userid='uid': 'userid' is not a field; expected one of "
                                          r"\['user_id'"):
        load_config(None, ["ingest.columns.userid=uid"])


def test_job_help_keeps_the_example_commands_on_their_own_lines():
    from jobs import train
    from jobs._cli import parser

    text = parser(train.__doc__).format_help()
    assert "\n    python -m jobs.train --conf conf/ml1m_natm.yaml [--resume]\n" in text


def test_embedding_a_baseline_says_where_its_lists_come_from(tmp_path):
    from jobs import embed

    with pytest.raises(InvalidInput, match=r"model='cooc' is a baseline.*jobs.baseline --model cooc"):
        embed.run(load_config(None, [f"warehouse={tmp_path}", "model=cooc"]))


def test_a_spark_read_failure_becomes_one_line_with_advice_that_fits_it():
    from jobs._cli import unreadable_file

    trace = "\n\tat org.apache.spark.Foo(Foo.scala:1)\n"
    mismatch = unreadable_file(Exception(
        "An error occurred while calling o1.count.\n: org.apache.spark.SparkException: [FAILED_READ_FILE."
        "PARQUET_COLUMN_DATA_TYPE_MISMATCH] Encountered error while reading file file:///d/b.parquet. Data type "
        "mismatches when reading Parquet column [user_id]. Expected Spark type bigint, actual Parquet type BINARY. "
        "SQLSTATE: KD001" + trace + "Caused by: org.apache.spark.X: column: [user_id]" + trace))
    assert str(mismatch).startswith("Encountered error while reading file file:///d/b.parquet. Data type mismatches "
                                    "when reading Parquet column [user_id]. Expected Spark type bigint, actual "
                                    "Parquet type BINARY: the files of one input must have the same columns")
    # the cause of a NO_HINT error is the first one, with or without a message; other failures get no
    # advice about columns
    npe = unreadable_file(Exception(
        ": org.apache.spark.SparkException: [FAILED_READ_FILE.NO_HINT] Encountered error while reading file "
        "file:///d/a.csv.gz.  SQLSTATE: KD001" + trace + "Caused by: java.lang.NullPointerException" + trace +
        "Caused by: java.io.EOFException: Unexpected end of input stream" + trace))
    assert "a.csv.gz. java.lang.NullPointerException: Spark could not read that file" in str(npe)
    assert "columns" not in str(npe) and "EOFException" not in str(npe)
    assert unreadable_file(ValueError("a bug")) is None


def test_the_debug_log_of_a_read_failure_holds_sparks_trace(caplog):
    from jobs._cli import command

    @command
    def job(argv):
        raise RuntimeError(": org.apache.spark.SparkException: [FAILED_READ_FILE.NO_HINT] Encountered error while "
                           "reading file file:///x.csv.  SQLSTATE: KD001\nCaused by: java.io.IOException: boom")

    with caplog.at_level("DEBUG", logger="jobs"), pytest.raises(SystemExit):
        job()
    rec = [r for r in caplog.records if r.exc_info]
    assert rec and isinstance(rec[0].exc_info[1].__cause__, RuntimeError)


def test_the_generator_sizes_its_tasks_by_the_actions_it_makes():
    # before: 8 tasks whatever the size (the README's 2M-user example: 12.5M rows per task)
    from ml.config import GenerateConfig

    assert GenerateConfig().num_partitions == 8  # the default's 1M actions
    assert GenerateConfig(num_users=2_000_000).num_partitions == 50
    assert GenerateConfig(num_users=2_000_000, partitions=3).num_partitions == 3  # a set number is kept
    with pytest.raises(ConfigError, match=r"generate.partitions=0 must be a number > 0"):
        GenerateConfig(partitions=0)


def test_a_key_given_twice_in_a_config_file_is_an_error(tmp_path):
    # YAML keeps the last value: a second train: section silently dropped the first one's settings
    conf = tmp_path / "twice.yaml"
    conf.write_text("train:\n  epochs: 6\n  lr: 0.002\nnatm:\n  layers: 2\ntrain:\n  batch_size: 512\n")
    with pytest.raises(ConfigError, match=r"twice.yaml .*key 'train' appears twice in one mapping \(first on line 1\)"
                                          r".*line 6"):
        load_config(conf)
    conf.write_text("train:\n  epochs: 2\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"key 'epochs' appears twice .*first on line 2"):
        load_config(conf)
    conf.write_text("train:\n  epochs: 2\nnatm:\n  epochs: 3\n")  # the same name in two mappings is no repeat
    with pytest.raises(ConfigError, match="unknown key 'natm.epochs'"):
        load_config(conf)
    # YAML's merge keys are no repeat either: the mapping's own keys win over the merged ones, as in YAML
    conf.write_text("graph:\n  <<: {window: 5, decay: true}\n  window: 3\n")
    assert (load_config(conf).graph.window, load_config(conf).graph.decay) == (3, True)
    conf.write_text("graph:\n  <<: [{window: 5}, {decay: true}]\n  top_n: 4\n")
    assert (load_config(conf).graph.window, load_config(conf).graph.decay, load_config(conf).graph.top_n) == (5, True, 4)


def test_a_config_path_that_is_no_utf8_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .* is a folder"):
        load_config(tmp_path)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(("# " + "x" * 20000 + "\ningest:\n  path: /data/caf\u00e9\n").encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.yaml is not UTF-8 text \(byte 20028: .*save it as UTF-8"):
        load_config(latin)
    latin.write_bytes("ingest:\n  path: /data/caf\u00e9\n".encode("utf-8"))
    assert load_config(latin).ingest.path == "/data/caf\u00e9"


def test_mapping_values_are_checked_and_a_null_spark_conf_value_unsets_the_key(tmp_path):
    from ml.data.session import session_settings

    conf = tmp_path / "on.yaml"
    conf.write_text("ingest:\n  format: csv\n  path: x\n  columns: {user_id: on}\n")
    with pytest.raises(ConfigError, match=r"ingest.columns.user_id=True must be a column name \(quote it in YAML"):
        load_config(conf)
    with pytest.raises(ConfigError, match=r"ingest.columns.user_id=None must be a column name \(an empty value"):
        load_config(None, ["ingest.format=csv", "ingest.path=x", "ingest.columns.user_id="])
    assert load_config(None, ["ingest.format=csv", "ingest.path=x", "ingest.columns.user_id=7"]).ingest.columns == {
        "user_id": "7"}  # a column named 7 (--set takes a string key's text as written)
    # spark.conf: nothing (or null) is not the text "None" handed to Spark, but no setting at all
    # (Spark's own default, here the JVM's time zone instead of our UTC); YAML's true is passed as text
    cfg = load_config(None, ["spark.conf.spark.sql.session.timeZone=", "spark.conf.spark.sql.ansi.enabled=true"])
    settings = session_settings(cfg.spark, submitted=False, given=set())
    assert "spark.sql.session.timeZone" not in settings and settings["spark.sql.ansi.enabled"] == "true"
    assert session_settings(load_config().spark, submitted=False, given=set())["spark.sql.session.timeZone"] == "UTC"


@pytest.mark.parametrize("fmt", ["taobao", "ml1m", "sasrec"])
def test_layout_keys_are_refused_for_the_fixed_formats(fmt):
    # taobao's ts is seconds: ingest.ts_unit=ms was ignored, and every row came out bad_ts with no word of it
    for key, value in (("ts_unit", "ms"), ("csv_sep", ";"), ("csv_encoding", "ISO-8859-1"), ("csv_header", "false")):
        which = "csv" if key.startswith("csv_") else "csv, parquet and delta"
        with pytest.raises(ConfigError, match=rf"ingest.{key}=.*ingest.format='{fmt}' has a fixed layout.*"
                                              rf"ingest.{key} is for {which} sources"):
            load_config(None, [f"ingest.format={fmt}", f"ingest.{key}={value}"])
    assert load_config(None, [f"ingest.format={fmt}", "ingest.ts_unit=s"]).ingest.ts_unit == "s"  # its own: fine
    # csv_schema alone is refused for the format, not first sent to csv_header=false
    with pytest.raises(ConfigError, match=rf"ingest.csv_schema=.*ingest.format='{fmt}' has a fixed layout"):
        load_config(None, [f"ingest.format={fmt}", "ingest.csv_schema=[a, b]"])
