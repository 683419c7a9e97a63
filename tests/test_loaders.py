"""Each loader on small files written in its dataset's real format (synthetic content)."""

import datetime as dt
import gzip
import json
from pathlib import Path

import pytest

from cotrec.config import DataConfig
from cotrec.data.preprocess import preprocess
from cotrec.data.sources import load_source
from cotrec.errors import DataError

USERS = [f"U{n}" for n in range(1, 7)]
ITEMS = [f"I{n}" for n in range(1, 6)]


def history():
    """Every user has every item, at distinct times; returns (user, item, unix seconds)."""
    base = 1_500_000_000
    return [(u, i, base + 3600 * (k * 10 + n)) for k, u in enumerate(USERS) for n, i in enumerate(ITEMS)]


def prepare_from(source, folder, **extra):
    data = DataConfig(source=source, path=str(folder), k_core=3, **extra)
    raw = load_source(data)
    return raw, preprocess(raw, data)


def check_tables(out, n_users=len(USERS), n_items=len(ITEMS)):
    assert out.stats["users"] == n_users and out.stats["items"] == n_items
    assert out.stats["interactions"] == n_users * n_items
    assert (out.items.caption.str.len() > 0).all()


def write_ml100k(folder: Path):
    folder.mkdir()
    ids = {u: str(n + 1) for n, u in enumerate(USERS)}
    item_ids = {i: str(n + 1) for n, i in enumerate(ITEMS)}
    (folder / "u.data").write_text("".join(f"{ids[u]}\t{item_ids[i]}\t4\t{t}\n" for u, i, t in history()))
    genres = ["0"] * 19
    lines = []
    for n, i in enumerate(ITEMS):
        flags = list(genres)
        flags[1 + n % 18] = "1"
        lines.append("|".join([item_ids[i], f"Caf\u00e9 Film {n} (199{n})", f"01-Jan-199{n}", "",
                               "http://example.invalid/", *flags]))
    (folder / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    (folder / "u.user").write_text("".join(f"{ids[u]}|30|F|writer|00000\n" for u in USERS))


def test_movielens_100k_official_layout(tmp_path):
    write_ml100k(tmp_path / "ml")
    raw, out = prepare_from("movielens", tmp_path / "ml")
    assert raw.domain == "movie"
    check_tables(out)
    assert out.items.caption.iloc[0] == "Caf\u00e9 Film 0" and out.items.year.iloc[0] == "1990"
    assert out.items.genres.iloc[0] == "Action"
    assert "occupation" in out.users.columns


def test_movielens_1m_official_layout(tmp_path):
    folder = tmp_path / "ml1m"
    folder.mkdir()
    ids = {i: str(n + 1) for n, i in enumerate(ITEMS)}
    (folder / "ratings.dat").write_text("".join(f"{u[1:]}::{ids[i]}::5::{t}\n" for u, i, t in history()))
    (folder / "movies.dat").write_bytes("".join(
        f"{ids[i]}::Film {i}, The (1999)::Comedy|Drama\n" for i in ITEMS).encode("latin-1"))
    _, out = prepare_from("movielens", folder)
    check_tables(out)
    assert out.items.caption.iloc[0] == "Film I1, The" and out.items.genres.iloc[0] == "Comedy, Drama"


def test_mind_history_then_clicks(tmp_path):
    folder = tmp_path / "mind"
    folder.mkdir()
    news = [f"N{n}" for n in range(1, 6)]
    (folder / "news.tsv").write_text("".join(
        f"{n}\tsports\tfootball\tHeadline {n}\tAbstract of {n}\thttps://x.invalid\t[]\t[]\n" for n in news))
    rows = []
    for k, u in enumerate(USERS):
        # History N1 N2 N3 before the log; clicks N4 then N5 in two impressions; N1-0 not clicked.
        rows.append(f"{2*k+1}\t{u}\t11/15/2019 9:00:0{k} AM\tN1 N2 N3\tN4-1 N1-0\n")
        rows.append(f"{2*k+2}\t{u}\t11/15/2019 2:30:00 PM\tN1 N2 N3\tN5-1\n")
    (folder / "behaviors.tsv").write_text("".join(rows))
    raw, out = prepare_from("mind", folder)
    assert raw.domain == "news"
    check_tables(out)
    caption = dict(zip(out.items.item_idx, out.items.item_id))
    first_user = out.interactions[out.interactions.user_idx == 0].sort_values("position")
    assert [caption[i] for i in first_user.item_idx] == ["N1", "N2", "N3", "N4", "N5"]
    assert set(out.items.columns) >= {"category", "abstract"}


def test_amazon_2014_python_literal_metadata(tmp_path):
    folder = tmp_path / "amazon"
    folder.mkdir()
    reviews = [json.dumps({"reviewerID": u, "asin": i, "overall": 5.0, "unixReviewTime": t,
                           "reviewText": "good", "summary": "ok"}) for u, i, t in history()]
    (folder / "reviews_Grocery_and_Gourmet_Food_5.json").write_text("\n".join(reviews) + "\n")
    meta = [str({"asin": i, "title": f"Tea {i}", "description": "Loose leaf tea.",
                 "categories": [["Grocery & Gourmet Food", "Beverages", "Tea"]]}) for i in ITEMS]
    (folder / "meta_Grocery_and_Gourmet_Food.json").write_text("\n".join(meta) + "\n")
    raw, out = prepare_from("amazon", folder)
    assert raw.domain == "product"
    check_tables(out)
    assert out.items.categories.iloc[0] == "Grocery & Gourmet Food, Beverages, Tea"
    assert out.items.description.iloc[0] == "Loose leaf tea."


def test_amazon_2018_gzipped_json(tmp_path):
    folder = tmp_path / "amazon"
    folder.mkdir()
    with gzip.open(folder / "Grocery_and_Gourmet_Food.json.gz", "wt") as handle:
        for u, i, t in history():
            handle.write(json.dumps({"overall": 4.0, "verified": True, "reviewerID": u, "asin": i,
                                     "unixReviewTime": t, "reviewTime": "01 1, 2018"}) + "\n")
    with gzip.open(folder / "meta_Grocery_and_Gourmet_Food.json.gz", "wt") as handle:
        for i in ITEMS:
            handle.write(json.dumps({"asin": i, "title": f"Coffee {i}", "brand": "Acme",
                                     "description": ["Whole bean.", "Dark roast."],
                                     "category": ["Grocery & Gourmet Food", "Coffee"]}) + "\n")
    _, out = prepare_from("amazon", folder)
    check_tables(out)
    assert out.items.description.iloc[0] == "Whole bean. Dark roast."
    assert out.items.categories.iloc[0] == "Grocery & Gourmet Food, Coffee"


def test_yelp_reviews_and_businesses(tmp_path):
    folder = tmp_path / "yelp"
    folder.mkdir()
    with open(folder / "yelp_academic_dataset_review.json", "w") as handle:
        for n, (u, i, t) in enumerate(history()):
            date = dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            handle.write(json.dumps({"review_id": f"r{n}", "user_id": u, "business_id": i, "stars": 4,
                                     "useful": 0, "text": "nice", "date": date}) + "\n")
    with open(folder / "yelp_academic_dataset_business.json", "w") as handle:
        for i in ITEMS:
            handle.write(json.dumps({"business_id": i, "name": f"Diner {i}", "city": "Tucson",
                                     "state": "AZ", "categories": "Restaurants, Diners"}) + "\n")
    raw, out = prepare_from("yelp", folder)
    assert raw.domain == "business"
    check_tables(out)
    assert out.items.categories.iloc[0] == "Restaurants, Diners"


def test_domain_override(tmp_path):
    write_ml100k(tmp_path / "ml")
    raw, _ = prepare_from("movielens", tmp_path / "ml", domain="product")
    assert raw.domain == "product"


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "u.data").unlink(), r"no MovieLens files"),
    (lambda f: (f / "u.data").write_text("1\t2\t3\t881250949\n1\t3\t4\tyesterday\n"), r"u\.data line 2: timestamp 'yesterday'"),
    (lambda f: (f / "u.data").write_text("1\t2\t3\t881250949\n1\t3\t4\t1\t9\t9\n"), r"u\.data: malformed: .*line 2"),
    (lambda f: (f / "u.data").write_text(""), r"u\.data: the file is empty"),
    (lambda f: (f / "u.item").write_bytes(b"1|Film (1999)|x||u|" + b"2|" * 18 + b"0\n"), r"u\.item line 1: genre flags"),
])
def test_bad_movielens_files_name_file_and_line(tmp_path, damage, message):
    write_ml100k(tmp_path / "ml")
    damage(tmp_path / "ml")
    with pytest.raises(DataError, match=message):
        prepare_from("movielens", tmp_path / "ml")


def test_bad_json_lines_name_the_line(tmp_path):
    folder = tmp_path / "yelp"
    folder.mkdir()
    (folder / "review.json").write_text('{"user_id": "a", "business_id": "b", "date": "2018-01-01 00:00:00"}\n{broken\n')
    (folder / "business.json").write_text('{"business_id": "b", "name": "x"}\n')
    with pytest.raises(DataError, match=r"review\.json line 2: not a JSON object"):
        prepare_from("yelp", folder)
    (folder / "review.json").write_text('{"user_id": "a", "date": "2018-01-01 00:00:00"}\n')
    with pytest.raises(DataError, match=r"review\.json: missing field 'business_id'"):
        prepare_from("yelp", folder)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="no such data folder"):
        prepare_from("mind", tmp_path / "nope")
