"""The simulated broker (workers/backtest/simulator.py), pure: no database.

Every expected price is worked out by hand from the rules in the module docstring, with
round numbers: a bar opening at 100 (high 105, low 95, close 102, volume 1000), a tick
of 0.01 and a quantity step of 0.001, unless a test says otherwise.
"""

from __future__ import annotations

from decimal import Decimal as D

import pytest

from workers.backtest.simulator import (
    Costs,
    InstrumentRules,
    SimBar,
    SimOrder,
    Simulator,
    SimulatorError,
    Slippage,
    round_down,
    touched_price,
)

RULES = InstrumentRules(price_tick=D("0.01"), quantity_step=D("0.001"))
RICH = D(10) ** 9  # enough cash that the cash rule never bites
TS = 1_767_225_600_000_000  # the bar's open time, epoch microseconds


def bar(o="100", h="105", lo="95", c="102", v="1000", atr: float | None = None) -> SimBar:
    return SimBar(TS, D(o), D(h), D(lo), D(c), D(v), atr)


BAR = bar()


def order(side="buy", kind="market", qty="1", limit=None, stop=None, trigger=None,
          reduce_only=False, oid=7) -> SimOrder:
    return SimOrder(oid, side, kind, D(qty), reduce_only=reduce_only,
                    limit_price=None if limit is None else D(limit),
                    stop_price=None if stop is None else D(stop),
                    trigger_price=None if trigger is None else D(trigger))


def fill(o: SimOrder, b: SimBar = BAR, costs: Costs | None = None, cash=RICH,
         rules: InstrumentRules = RULES, fx=D(1)):
    return Simulator(costs or Costs()).match(o, b, rules, cash=D(cash), fx=fx)


def price(o: SimOrder, b: SimBar = BAR, costs: Costs | None = None,
          rules: InstrumentRules = RULES) -> D | None:
    f = fill(o, b, costs, rules=rules)
    return None if f is None else f.price


# ----------------------------------------------------------------------------- matching


def test_market_order_fills_in_full_at_the_open_as_taker():
    f = fill(order(qty="2.5"))
    assert f is not None
    assert (f.order_id, f.quantity, f.price, f.liquidity, f.ts_us) == (7, D("2.5"), D(100),
                                                                       "taker", TS)
    assert (f.commission, f.unfilled, f.reason) == (0, 0, "")
    # a sell market order too (no cash needed)
    assert price(order("sell")) == D(100)


@pytest.mark.parametrize(("side", "limit", "b", "expected"), [
    # buy limit 97: the bar's low 95 touches it -> the limit price
    ("buy", "97", bar(), D(97)),
    # the bar opens at 96, already below the limit 97: filled at the (better) open
    ("buy", "97", bar(o="96", h="99", lo="94", c="98"), D(96)),
    # the low is exactly the limit: touched
    ("buy", "95", bar(), D(95)),
    # the low 98 never reaches 97
    ("buy", "97", bar(h="105", lo="98"), None),
    # sell limit 104: the high 105 touches it
    ("sell", "104", bar(), D(104)),
    # the bar opens at 106, above the limit 104: filled at the (better) open
    ("sell", "104", bar(o="106", h="108", lo="103", c="107"), D(106)),
    # the high 103 never reaches 104
    ("sell", "104", bar(h="103"), None),
])
def test_limit_order(side, limit, b, expected):
    f = fill(order(side, "limit", limit=limit), b)
    if expected is None:
        assert f is None
        assert touched_price(order(side, "limit", limit=limit), b) is None
    else:
        assert f is not None
        assert (f.price, f.liquidity) == (expected, "maker")


@pytest.mark.parametrize(("side", "stop", "b", "expected"), [
    # buy stop 104: the high 105 touches it -> the stop price
    ("buy", "104", bar(), D(104)),
    # the bar gaps up to open 106, above the stop: filled at the (worse) open
    ("buy", "104", bar(o="106", h="108", lo="103", c="107"), D(106)),
    # the high 103 never reaches 104
    ("buy", "104", bar(h="103"), None),
    # sell stop 96: the low 95 touches it
    ("sell", "96", bar(), D(96)),
    # the bar gaps down to open 94, below the stop: filled at the (worse) open
    ("sell", "96", bar(o="94", h="97", lo="93", c="95"), D(94)),
    # the low 97 never reaches 96
    ("sell", "96", bar(lo="97"), None),
])
def test_stop_order(side, stop, b, expected):
    f = fill(order(side, "stop", stop=stop), b)
    if expected is None:
        assert f is None
    else:
        assert f is not None
        assert (f.price, f.liquidity) == (expected, "taker")


@pytest.mark.parametrize(("side", "stop", "limit", "b", "expected"), [
    # buy stop 104 / limit 104.5: triggered at 104, inside the limit: it trades at once,
    # taking liquidity -> 104, taker
    ("buy", "104", "104.5", bar(), (D(104), "taker")),
    # gap up to 104.2, still inside the limit -> the open, taker
    ("buy", "104", "104.5", bar(o="104.2", h="107", lo="104", c="105"), (D("104.2"), "taker")),
    # gap up to 106 (above the limit): it rests; the bar comes back to 104 -> 104.5, maker
    ("buy", "104", "104.5", bar(o="106", h="107", lo="104", c="105"), (D("104.5"), "maker")),
    # gap up to 106 and the low 105 never comes back to the limit 104.5 -> no fill
    ("buy", "104", "104.5", bar(o="106", h="107", lo="105", c="106"), None),
    # the stop is never touched -> no fill, whatever the limit
    ("buy", "106", "107", bar(), None),
    # sell stop 96 / limit 95.5: triggered at 96 -> 96, taker
    ("sell", "96", "95.5", bar(), (D(96), "taker")),
    # gap down to 94 (below the limit 95.5): it rests; the high 96 comes back -> 95.5, maker
    ("sell", "96", "95.5", bar(o="94", h="96", lo="93", c="95"), (D("95.5"), "maker")),
    # gap down to 94 and the high 95 stays below the limit -> no fill
    ("sell", "96", "95.5", bar(o="94", h="95", lo="93", c="94"), None),
])
def test_stop_limit_order_becomes_a_limit_once_triggered(side, stop, limit, b, expected):
    f = fill(order(side, "stop_limit", stop=stop, limit=limit), b)
    if expected is None:
        assert f is None
    else:
        assert f is not None
        assert (f.price, f.liquidity) == expected


def test_a_marketable_stop_limit_pays_the_taker_fee():
    # triggered at 104 inside its limit 104.5: 2 x 104 x 0.001 = 0.208 (not the maker 0.0002)
    f = fill(order("buy", "stop_limit", qty="2", stop="104", limit="104.5"),
             costs=Costs(taker_fee=D("0.001"), maker_fee=D("0.0002")))
    assert f is not None and (f.price, f.liquidity, f.commission) == (D(104), "taker", D("0.208"))


def test_an_order_with_a_trigger_price_fills_at_the_trigger():
    # a stop-loss the database fired at 95.5 (or moved to the open on a gap): that price,
    # taker, whatever the bar's open; even the order type does not matter any more
    for kind in ("market", "limit", "stop"):
        o = order("sell", kind, qty="3", limit="120", stop="120", trigger="95.5",
                  reduce_only=True)
        f = fill(o, costs=Costs(taker_fee=D("0.001"), maker_fee=D("0.0002")), cash=D(0))
        assert f is not None
        # commission 3 x 95.5 x 0.001 = 0.2865 (taker)
        assert (f.price, f.quantity, f.liquidity, f.commission) == (
            D("95.5"), D(3), "taker", D("0.2865"))


# ----------------------------------------------------------------------------- costs


@pytest.mark.parametrize(("spread", "buy", "sell"), [
    # half of 0.001 x 100 = 0.05 against the trader on each side
    ("0.001", "100.05", "99.95"),
    # half of 0.0003 x 100 = 0.015: 100.015 rounds up to 100.02 for the buyer,
    # 99.985 down to 99.98 for the seller
    ("0.0003", "100.02", "99.98"),
])
def test_spread_half_on_each_side_rounded_against_the_trader(spread, buy, sell):
    costs = Costs(spread=D(spread))
    assert price(order("buy"), costs=costs) == D(buy)
    assert price(order("sell"), costs=costs) == D(sell)


@pytest.mark.parametrize(("model", "b", "qty", "buy", "sell"), [
    # 5 bps of 100 = 0.05
    ("bps:5", BAR, "1", "100.05", "99.95"),
    # 1.5 bps of 100 = 0.015 -> 100.02 / 99.98 (rounded against the trader)
    ("bps:1.5", BAR, "1", "100.02", "99.98"),
    # half of an ATR of 2.5 = 1.25
    ("atr:0.5", bar(atr=2.5), "1", "101.25", "98.75"),
    # an ATR of 0.333 (a float, read via its repr): 100.333 -> 100.34, 99.667 -> 99.66
    ("atr:1", bar(atr=0.333), "1", "100.34", "99.66"),
    # no ATR yet (the first bars) or a NaN: no slippage
    ("atr:0.5", bar(atr=None), "1", "100", "100"),
    ("atr:0.5", bar(atr=float("nan")), "1", "100", "100"),
    # volume impact 2 x 10 / 1000 = 2 % of 100 = 2
    ("volume:2", BAR, "10", "102", "98"),
    # 1 x 500 / 1000 = 50 %, capped at 10 % = 10
    ("volume:1", BAR, "500", "110", "90"),
    # a bar with no volume: the cap, 10 %
    ("volume:0.001", bar(v="0"), "1", "110", "90"),
])
def test_slippage_models_move_the_price_against_the_trader(model, b, qty, buy, sell):
    costs = Costs(slippage=Slippage.parse(model))
    assert price(order("buy", qty=qty), b, costs) == D(buy)
    assert price(order("sell", qty=qty), b, costs) == D(sell)


def test_spread_and_slippage_add_up_and_round_once_to_a_coarse_tick():
    # tick 0.5: spread 0.001 -> 0.05, bps:10 -> 0.1; 100.15 rounds up to 100.5 for a buy,
    # 99.85 down to 99.5 for a sell
    rules = InstrumentRules(D("0.5"), D("0.001"))
    costs = Costs(spread=D("0.001"), slippage=Slippage.parse("bps:10"))
    assert price(order("buy"), costs=costs, rules=rules) == D("100.5")
    assert price(order("sell"), costs=costs, rules=rules) == D("99.5")


def test_a_price_never_rounds_below_one_tick():
    # bps:20000 = 200 % of 100 against a seller: -100 -> one tick (0.01); (parse refuses
    # more than bps:1000, the model itself does not)
    costs = Costs(slippage=Slippage("bps", D(20000)))
    assert price(order("sell"), costs=costs) == D("0.01")


def test_limit_orders_trade_at_the_quote_never_beyond_their_limit():
    # bar mid prices 100 / 105 / 95 / 102, spread 0.002: the ask is 0.1 % above them, the
    # bid 0.1 % below. A buy limit at 97 is reached (ask low 95.095) and fills at 97, not
    # 97 + half the spread (it was 97.10: past the limit, which no venue does); the bps:50
    # slippage does not apply to a resting limit order
    costs = Costs(spread=D("0.002"), slippage=Slippage.parse("bps:50"))
    assert price(order("buy", "limit", limit="97"), costs=costs) == D("97")
    assert price(order("sell", "limit", limit="104"), costs=costs) == D("104")
    # a bar that touches the limit with its mid but not with its quote does not fill it
    # (ask low 95 x 1.001 = 95.095 > 95.05; bid high 105 x 0.999 = 104.895 < 104.95)
    assert fill(order("buy", "limit", limit="95.05"), costs=costs) is None
    assert fill(order("sell", "limit", limit="104.95"), costs=costs) is None
    # marketable at the open: the open's quote, 100.1 ask and 99.9 bid, within the limits
    assert price(order("buy", "limit", limit="101"), costs=costs) == D("100.1")
    assert price(order("sell", "limit", limit="99"), costs=costs) == D("99.9")
    # a limit between the open's mid and its quote: the ask 100.1 is past a 100.05 limit
    # at the open, and the bar comes down to it: filled at the limit
    assert price(order("buy", "limit", limit="100.05"), costs=costs) == D("100.05")
    # the same costs on a market buy: 100 + 0.1 + 0.5 = 100.6
    assert price(order("buy"), costs=costs) == D("100.6")


def test_maker_and_taker_commission():
    costs = Costs(taker_fee=D("0.001"), maker_fee=D("0.0002"))
    # limit buy of 2 at 97: maker, 2 x 97 x 0.0002 = 0.0388
    f = fill(order("buy", "limit", qty="2", limit="97"), costs=costs)
    assert f is not None and (f.liquidity, f.commission) == ("maker", D("0.0388"))
    # market buy of 2 at 100: taker, 2 x 100 x 0.001 = 0.2
    f = fill(order("buy", qty="2"), costs=costs)
    assert f is not None and (f.liquidity, f.commission) == ("taker", D("0.2"))
    # stop sell of 2 at 96: taker, 2 x 96 x 0.001 = 0.192
    f = fill(order("sell", "stop", qty="2", stop="96"), costs=costs)
    assert f is not None and (f.liquidity, f.commission) == ("taker", D("0.192"))
    # commission is on the price after costs: spread 0.001 -> 100.05 x 2 x 0.001 = 0.2001
    f = fill(order("buy", qty="2"), costs=Costs(taker_fee=D("0.001"), spread=D("0.001")))
    assert f is not None and (f.price, f.commission) == (D("100.05"), D("0.2001"))


# ----------------------------------------------------------------------------- cash


def test_a_buy_larger_than_the_cash_fills_the_affordable_part():
    costs = Costs(taker_fee=D("0.001"))
    # cash 1000 at 100 with a 0.1 % fee: 1000 / 100.1 = 9.99000999 -> 9.990 (step 0.001)
    f = fill(order("buy", qty="20"), costs=costs, cash=D(1000))
    assert f is not None
    assert (f.quantity, f.unfilled, f.price) == (D("9.990"), D("10.010"), D(100))
    assert f.commission == D("0.999")  # 9.99 x 100 x 0.001
    assert f.quantity * f.price + f.commission <= 1000  # 999.999
    assert f.reason.startswith("INSUFFICIENT_CASH: ")
    assert "affordable=9.990" in f.reason and "ordered=20" in f.reason
    assert "\n" not in f.reason
    # with a whole-unit step the affordable part rounds down to 9
    f = fill(order("buy", qty="20"), costs=costs, cash=D(1000),
             rules=InstrumentRules(D("0.01"), D(1)))
    assert f is not None and (f.quantity, f.unfilled) == (D(9), D(11))


def test_the_cash_check_uses_the_price_after_costs_and_the_fx_rate():
    # spread 0.002 -> 100.1; cash 1001 buys exactly 10 of them (fee 0)
    f = fill(order("buy", qty="20"), costs=Costs(spread=D("0.002")), cash=D(1001))
    assert f is not None and (f.price, f.quantity, f.unfilled) == (D("100.1"), D(10), D(10))
    # the instrument quoted in a currency worth 2 account units: 1000 / 200 = 5
    f = fill(order("buy", qty="20"), cash=D(1000), fx=D(2))
    assert f is not None and (f.quantity, f.unfilled) == (D(5), D(15))


def test_an_order_the_cash_covers_fills_in_full():
    # exactly affordable: 10 x 100 x 1.001 = 1001
    f = fill(order("buy", qty="10"), costs=Costs(taker_fee=D("0.001")), cash=D(1001))
    assert f is not None and (f.quantity, f.unfilled, f.reason) == (D(10), 0, "")


def test_too_little_cash_for_the_minimum_fills_nothing():
    rules = InstrumentRules(D("0.01"), D("0.001"), min_quantity=D(1))
    # cash 50 affords 0.5 at 100, below the minimum 1: nothing fills, all 20 unfilled
    f = fill(order("buy", qty="20"), cash=D(50), rules=rules)
    assert f is not None
    assert (f.quantity, f.unfilled, f.commission) == (0, D(20), 0)
    assert f.reason.startswith("INSUFFICIENT_CASH: ") and "affordable=0" in f.reason
    # no minimum, but the cash does not buy one step (0.05 / 100 = 0.0005 < 0.001)
    f = fill(order("buy", qty="1"), cash=D("0.05"))
    assert f is not None and (f.quantity, f.unfilled) == (0, D(1))
    # negative cash buys nothing either
    f = fill(order("buy", qty="1"), cash=D(-10))
    assert f is not None and (f.quantity, f.unfilled) == (0, D(1))


def test_reducing_orders_and_sells_fill_in_full_without_cash():
    costs = Costs(taker_fee=D("0.001"))
    # a reduce-only buy (covering a short) with no cash at all: the whole 20 at 100
    f = fill(order("buy", qty="20", reduce_only=True), costs=costs, cash=D(0))
    assert f is not None
    assert (f.quantity, f.unfilled, f.reason, f.commission) == (D(20), 0, "", D(2))
    # a sell (closing a long or opening a short) never needs cash
    f = fill(order("sell", qty="20"), costs=costs, cash=D(0))
    assert f is not None and (f.quantity, f.unfilled) == (D(20), 0)


def test_the_closing_part_of_a_reversal_always_fills():
    # buy 30 that first buys back a short of 10: the 10 cost 1000 at 100 and always fill;
    # the 1000 left affords 10 of the 20 that open the long -> 20 filled, 10 cancelled
    o = SimOrder(7, "buy", "market", D(30), closing=D(10))
    f = fill(o, cash=D(2000))
    assert f is not None and (f.quantity, f.unfilled) == (D(20), D(10))
    assert f.reason.endswith("ordered=30, affordable=20")
    # a short of 100 bought back at 210 with cash 20000: the close (21000) fills in full,
    # leaving the cash negative; nothing opens (the 5.263 of the long is cancelled)
    o = SimOrder(7, "buy", "market", D("105.263"), closing=D(100))
    f = fill(o, bar(o="210", h="210", lo="200", c="205"), cash=D(20000))
    assert f is not None and (f.quantity, f.unfilled) == (D(100), D("5.263"))
    # without the closing part the same order would leave a short of 4.762:
    # 20000 / 210 = 95.238
    f = fill(SimOrder(7, "buy", "market", D("105.263")), bar(o="210", h="210", lo="200",
                                                             c="205"), cash=D(20000))
    assert f is not None and (f.quantity, f.unfilled) == (D("95.238"), D("10.025"))
    # the opening part must reach the minimum: 0.5 affordable, minimum 1 -> only the close
    rules = InstrumentRules(D("0.01"), D("0.001"), min_quantity=D(1))
    f = fill(SimOrder(7, "buy", "market", D(12), closing=D(10)), cash=D(1050), rules=rules)
    assert f is not None and (f.quantity, f.unfilled) == (D(10), D(2))
    # a closing part as large as the order (or larger): the whole order fills
    f = fill(SimOrder(7, "buy", "market", D(5), closing=D(8)), cash=D(0))
    assert f is not None and (f.quantity, f.unfilled) == (D(5), 0)


def test_round_down():
    assert round_down(D("9.9999"), D("0.001")) == D("9.999")
    assert round_down(D("10"), D("0.001")) == D(10)
    assert round_down(D("7.9"), D(2)) == D(6)
    assert round_down(D("-1"), D("0.001")) == 0
    assert round_down(D(0), D("0.001")) == 0


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(("text", "kind", "value"), [
    (None, "none", D(0)), ("", "none", D(0)), ("none", "none", D(0)), ("0", "none", D(0)),
    ("bps:5", "bps", D(5)), (" bps:2.5 ", "bps", D("2.5")), ("atr:0.1", "atr", D("0.1")),
    ("volume:3", "volume", D(3)), ("bps:0", "bps", D(0)),
    ("bps:1000", "bps", D(1000)), ("atr:10", "atr", D(10)), ("volume:100", "volume", D(100)),
])
def test_slippage_parse(text, kind, value):
    s = Slippage.parse(text)
    assert (s.kind, s.value) == (kind, value)
    assert Slippage.parse(str(s)) == s  # str() is what a run stores and reads back


@pytest.mark.parametrize(("text", "says"), [
    ("foo:1", "expected none, bps:N, atr:F or volume:K"),
    ("bps", "expected none, bps:N, atr:F or volume:K"),
    ("5", "expected none, bps:N, atr:F or volume:K"),
    ("bps:abc", "'abc' is not a number"),
    ("bps:", "'' is not a number"),
    ("bps:-1", "the value must be a number >= 0"),
    ("atr:nan", "the value must be a number >= 0"),
    ("volume:Infinity", "the value must be a number >= 0"),
    # no upper bound used to run a 200 % slippage to -100 %, or atr:1e400 to no fills
    ("bps:20000", "at most bps:1000 (1000 basis points, 10 % of the price)"),
    ("bps:1000.01", "at most bps:1000"),
    ("atr:1e400", "at most atr:10 (10 times the ATR)"),
    ("atr:10.5", "at most atr:10"),
    ("volume:1e6", "at most volume:100"),
])
def test_slippage_parse_errors_are_one_line(text, says):
    with pytest.raises(SimulatorError) as err:
        Slippage.parse(text)
    message = str(err.value)
    assert says in message
    assert message.startswith(f"slippage {text!r}")
    assert "\n" not in message
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(("kwargs", "says"), [
    ({"taker_fee": D("0.1")}, "taker_fee must be a fraction below 0.1, got 0.1"),
    ({"maker_fee": D("0.5")}, "maker_fee must be a fraction below 0.1, got 0.5"),
    ({"spread": D("0.2")}, "spread must be a fraction below 0.1, got 0.2"),
    ({"maker_fee": D("-0.01")},
     "maker_fee must not be negative, got -0.01 (maker rebates are not modelled)"),
    ({"maker_fee": D("-0.00005")},
     "maker_fee must not be negative, got -0.00005 (maker rebates are not modelled)"),
    ({"taker_fee": D("NaN")}, "taker_fee must be a fraction below 0.1, got NaN"),
    ({"spread": D("Infinity")}, "spread must be a fraction below 0.1, got Infinity"),
    ({"taker_fee": D("-0.001")}, "taker_fee must not be negative, got -0.001"),
    ({"spread": D("-0.0001")}, "spread must not be negative, got -0.0001"),
])
def test_costs_validation(kwargs, says):
    with pytest.raises(SimulatorError) as err:
        Costs(**kwargs)
    assert str(err.value) == says


def test_costs_accept_zero():
    assert Costs(maker_fee=D(0)).maker_fee == D(0)
    assert Costs() == Costs(D(0), D(0), Slippage(), D(0))


def test_a_free_maker_fill_costs_nothing():
    f = fill(order("buy", "limit", qty="2", limit="97"), costs=Costs(maker_fee=D(0)))
    assert f is not None and (f.liquidity, f.commission) == ("maker", 0)
