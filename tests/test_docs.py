from tools.configdoc import README, readme_with_table


def test_readme_config_table_matches_settings():
    text = README.read_text()
    assert readme_with_table(text) == text, "README config table is stale: run python -m tools.configdoc --write"
