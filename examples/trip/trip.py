"""A trip booking on sagaline: a flight, a hotel and a car, or none of them.

Copy this file to start an app of your own. It is all there: the messages (the wire contract),
the services (each with its own state, touched only through its store), the saga that drives a
booking and compensates it in reverse, a read model, and the :class:`~sagaline.App` the
``sagaline`` command line runs (``sagaline --app trip:app ...``).

The rules are kept small so that every outcome is easy to produce: a flight to ``NOWHERE`` is
sold out, no hotel has rooms in ``ATLANTIS``, and there is no car for a ``MINOR``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar

import msgspec

from sagaline import (
    App,
    Command,
    Context,
    Envelope,
    Event,
    Orchestrator,
    Projection,
    SagaDefinition,
    Service,
    Step,
    StepKind,
    System,
    Views,
)

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")]
Place = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class TripMessage:
    """What every message of the app shares: it belongs to one trip."""

    __slots__ = ()
    correlation: ClassVar[str] = "trip_id"


# ------------------------------------------------------------------ the wire contract


class BookTripCommand(TripMessage, Command, kw_only=True, frozen=True):
    """A traveller asks for a trip: the one message clients may submit."""

    trip_id: Id
    traveller: Id
    destination: Place


class TripRequestedEvent(TripMessage, Event, kw_only=True, frozen=True):
    """The trip service accepted the request: the saga starts."""

    trip_id: Id
    traveller: Id
    destination: Place


class ReserveFlightCommand(TripMessage, Command, kw_only=True, frozen=True):
    trip_id: Id
    destination: Place


class FlightReservedEvent(TripMessage, Event, kw_only=True, frozen=True):
    trip_id: Id
    flight: str


class FlightUnavailableEvent(TripMessage, Event, kw_only=True, frozen=True):
    trip_id: Id
    reason: str


class CancelFlightCommand(TripMessage, Command, kw_only=True, frozen=True):
    trip_id: Id


class FlightCancelledEvent(TripMessage, Event, kw_only=True, frozen=True):
    trip_id: Id


class ReserveHotelCommand(TripMessage, Command, kw_only=True, frozen=True):
    trip_id: Id
    destination: Place


class HotelReservedEvent(TripMessage, Event, kw_only=True, frozen=True):
    trip_id: Id
    hotel: str


class HotelUnavailableEvent(TripMessage, Event, kw_only=True, frozen=True):
    trip_id: Id
    reason: str


class CancelHotelCommand(TripMessage, Command, kw_only=True, frozen=True):
    trip_id: Id


class HotelCancelledEvent(TripMessage, Event, kw_only=True, frozen=True):
    trip_id: Id


class RentCarCommand(TripMessage, Command, kw_only=True, frozen=True):
    trip_id: Id
    traveller: Id


class CarRentedEvent(TripMessage, Event, kw_only=True, frozen=True):
    trip_id: Id
    car: str


class CarUnavailableEvent(TripMessage, Event, kw_only=True, frozen=True):
    trip_id: Id
    reason: str


class TripBookedEvent(TripMessage, Event, kw_only=True, frozen=True):
    """Everything is booked: the saga's last word."""

    trip_id: Id


class CancelTripCommand(TripMessage, Command, kw_only=True, frozen=True):
    trip_id: Id
    reason: str


class TripCancelledEvent(TripMessage, Event, kw_only=True, frozen=True):
    trip_id: Id
    reason: str


# ------------------------------------------------------------------ the services


def _trip_service() -> Service:
    """Takes the traveller's request, and records how the trip ended."""
    service = Service("trip")

    @service.handles(BookTripCommand)
    async def book(ctx: Context, command: BookTripCommand) -> None:
        if await ctx.tx.get_document("trip.request", command.trip_id) is not None:
            return  # the same trip asked for twice starts one saga
        await ctx.tx.put_document("trip.request", command.trip_id, {"status": "REQUESTED"}, 0)
        ctx.publish(
            TripRequestedEvent(
                trip_id=command.trip_id,
                traveller=command.traveller,
                destination=command.destination,
            )
        )

    @service.handles(CancelTripCommand)
    async def cancel(ctx: Context, command: CancelTripCommand) -> None:
        ctx.publish(TripCancelledEvent(trip_id=command.trip_id, reason=command.reason))

    return service


def _reservations(
    name: str,
    reserve: type[Command],
    cancel: type[Command],
    refuse: Any,
    make: Any,
    cancelled: type[Event],
) -> Service:
    """A supplier: reserves once per trip (a retry answers the same way), cancels once."""
    service = Service(name)
    namespace = f"{name}.reservation"

    @service.handles(reserve)
    async def on_reserve(ctx: Context, command: Any) -> None:
        held = await ctx.tx.get_document(namespace, command.trip_id)
        if held is None:
            problem = refuse(command)
            data = (
                {"refused": problem}
                if problem
                else {"ref": f"{name[:2].upper()}-{command.trip_id}"}
            )
            await ctx.tx.put_document(namespace, command.trip_id, data, 0)
            held_data: Mapping[str, Any] = data
        else:
            held_data = held.data
        ctx.publish(make(command.trip_id, held_data))

    @service.handles(cancel)
    async def on_cancel(ctx: Context, command: Any) -> None:
        held = await ctx.tx.get_document(namespace, command.trip_id)
        if held is not None and not held.data.get("cancelled"):
            await ctx.tx.put_document(
                namespace, command.trip_id, {**held.data, "cancelled": True}, held.version
            )
        ctx.publish(cancelled(trip_id=command.trip_id))

    return service


def _flight(trip_id: str, held: Mapping[str, Any]) -> Event:
    if held.get("refused"):
        return FlightUnavailableEvent(trip_id=trip_id, reason=held["refused"])
    return FlightReservedEvent(trip_id=trip_id, flight=held["ref"])


def _hotel(trip_id: str, held: Mapping[str, Any]) -> Event:
    if held.get("refused"):
        return HotelUnavailableEvent(trip_id=trip_id, reason=held["refused"])
    return HotelReservedEvent(trip_id=trip_id, hotel=held["ref"])


def _car(trip_id: str, held: Mapping[str, Any]) -> Event:
    if held.get("refused"):
        return CarUnavailableEvent(trip_id=trip_id, reason=held["refused"])
    return CarRentedEvent(trip_id=trip_id, car=held["ref"])


def _car_rental() -> Service:
    """Rents a car, the pivot: a rented car is not given back, so nothing after it undoes."""
    service = Service("car")

    @service.handles(RentCarCommand)
    async def rent(ctx: Context, command: RentCarCommand) -> None:
        held = await ctx.tx.get_document("car.rental", command.trip_id)
        if held is None:
            refused = "no car for a minor" if command.traveller == "MINOR" else None
            data = {"refused": refused} if refused else {"ref": f"CA-{command.trip_id}"}
            await ctx.tx.put_document("car.rental", command.trip_id, data, 0)
        else:
            data = dict(held.data)
        ctx.publish(_car(command.trip_id, data))

    return service


# ------------------------------------------------------------------ the saga


def _cancel_reason(data: Mapping[str, Any]) -> str:
    failure = data.get("_failure") or {}
    return f"{failure.get('step', 'the trip')} failed: {failure.get('reason', 'unknown')}"


TRIP_SAGA = SagaDefinition(
    name="trip",
    description="Book a flight, a hotel and a car; compensate in reverse when one fails.",
    start=TripRequestedEvent,
    steps=(
        Step(
            name="request_trip",
            compensation=lambda d: CancelTripCommand(trip_id=d["tripId"], reason=_cancel_reason(d)),
            compensated=TripCancelledEvent,
        ),
        Step(
            name="reserve_flight",
            command=lambda d: ReserveFlightCommand(
                trip_id=d["tripId"], destination=d["destination"]
            ),
            success=FlightReservedEvent,
            failures=(FlightUnavailableEvent,),
            compensation=lambda d: CancelFlightCommand(trip_id=d["tripId"]),
            compensated=FlightCancelledEvent,
        ),
        Step(
            name="reserve_hotel",
            command=lambda d: ReserveHotelCommand(
                trip_id=d["tripId"], destination=d["destination"]
            ),
            success=HotelReservedEvent,
            failures=(HotelUnavailableEvent,),
            compensation=lambda d: CancelHotelCommand(trip_id=d["tripId"]),
            compensated=HotelCancelledEvent,
        ),
        Step(
            name="rent_car",
            command=lambda d: RentCarCommand(trip_id=d["tripId"], traveller=d["traveller"]),
            success=CarRentedEvent,
            failures=(CarUnavailableEvent,),
            kind=StepKind.PIVOT,
        ),
    ),
    on_completed=lambda d: TripBookedEvent(trip_id=d["tripId"]),
)


# ------------------------------------------------------------------ the read model

TRIPS = "trips.trip"


def _trips() -> Projection:
    """One row per trip: who, where, and how it stands."""
    projection = Projection("trips", TRIPS)

    @projection.on(TripRequestedEvent)
    async def requested(views: Views, event: TripRequestedEvent, envelope: Envelope) -> None:
        row = await views.get(event.trip_id) or {}
        row.update(tripId=event.trip_id, traveller=event.traveller, destination=event.destination)
        row.setdefault("status", "REQUESTED")
        await views.put(event.trip_id, row)

    @projection.on(TripBookedEvent, TripCancelledEvent)
    async def ended(
        views: Views, event: TripBookedEvent | TripCancelledEvent, envelope: Envelope
    ) -> None:
        row = await views.get(event.trip_id) or {"tripId": event.trip_id}
        if isinstance(event, TripBookedEvent):
            row.update(status="BOOKED", reason=None)
        else:
            row.update(status="CANCELLED", reason=event.reason)
        await views.put(event.trip_id, row)

    return projection


# ------------------------------------------------------------------ the app


def build(settings: Mapping[str, str]) -> System:
    """The trip system: five services, of which the orchestrator drives the saga."""
    sold_out = settings.get("sold_out", "NOWHERE")
    return System(
        [
            _trip_service(),
            _reservations(
                "flight",
                ReserveFlightCommand,
                CancelFlightCommand,
                lambda c: "sold out" if c.destination == sold_out else None,
                _flight,
                FlightCancelledEvent,
            ),
            _reservations(
                "hotel",
                ReserveHotelCommand,
                CancelHotelCommand,
                lambda c: "no rooms" if c.destination == "ATLANTIS" else None,
                _hotel,
                HotelCancelledEvent,
            ),
            _car_rental(),
            Orchestrator([TRIP_SAGA]).service,
            _trips().service(),
        ],
        accepts=[BookTripCommand],
    )


app = App(
    name="trip",
    build=build,
    projections=(_trips(),),
    description="Book a flight, a hotel and a car, or none of them.",
    settings={"sold_out": "the destination whose flights are sold out (default NOWHERE)"},
)
